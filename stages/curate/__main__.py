from stages.common.cli import stage_entrypoint
from stages.curate import Config, run

stage_entrypoint("curate", Config, run)
