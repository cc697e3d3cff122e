import sys

from stages.common.cli import stage_main
from stages.rl import Config, run

sys.exit(stage_main("rl", Config, run))
