from stages.common.cli import stage_entrypoint
from stages.rl import Config, run

stage_entrypoint("rl", Config, run)
