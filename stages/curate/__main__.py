import sys

from stages.common.cli import stage_main
from stages.curate import Config, run

sys.exit(stage_main("curate", Config, run))
