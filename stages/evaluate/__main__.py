from stages.common.cli import stage_entrypoint
from stages.evaluate import Config, run

stage_entrypoint("evaluate", Config, run)
