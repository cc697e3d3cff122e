import sys

from stages.common.cli import stage_main
from stages.sft import Config, run

sys.exit(stage_main("sft", Config, run))
