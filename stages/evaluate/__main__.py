import sys

from stages.common.cli import stage_main
from stages.evaluate import Config, run

sys.exit(stage_main("evaluate", Config, run))
