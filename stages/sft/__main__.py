from stages.common.cli import stage_entrypoint
from stages.sft import Config, run

stage_entrypoint("sft", Config, run)
