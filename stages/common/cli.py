"""The command line every stage shares: `python -m stages.<name> --config FILE [--set k=v] [--output F]`.

This is the command the flow runs as a subprocess and the entrypoint each stage's container will run.
Exit codes: 0 done, 2 bad config, 3 an input artifact failed its digest check, 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from stages.common.config import ConfigError, load_config
from stages.common.tracking import DigestMismatchError, StageOutput, write_json_atomic


def stage_main(name: str, config_cls: type, run: Callable[..., StageOutput], argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=f"Run the {name} stage.")
    parser.add_argument("--config", required=True, help="YAML/JSON file holding this stage's config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set seed=3 (repeatable)")
    parser.add_argument("--output", help="write the stage's Output (run id, artifact URIs, digests) here as JSON")
    parser.add_argument("--parent-run-id", help="MLflow run id of the pipeline run this stage belongs to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    try:
        config = load_config(config_cls, args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        output = run(config, parent_run_id=args.parent_run_id)
    except DigestMismatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except ConfigError as err:  # runtime checks that depend on data (a prompt too long, say)
        print(f"error: {err}", file=sys.stderr)
        return 2
    payload: dict[str, Any] = output.model_dump(mode="json")
    if args.output:
        write_json_atomic(args.output, payload)
    print(f"{name}: done, MLflow run {output.run_id}")
    return 0

