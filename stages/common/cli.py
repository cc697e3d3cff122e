"""The command line every stage shares:

    python -m stages.<name> (--config FILE | --config-json JSON) [--set k=v] [--run-id ID]
                            [--parent-run-id ID] [--output FILE]

The same command runs locally, as the flow's subprocess and as the entrypoint of the stage's
container (`docker run ufo-<name> --help` prints this with the stage's config fields).
Exit codes: 0 done, 2 bad config, 3 an input artifact failed its digest check, 130/143 stopped by
SIGINT/SIGTERM (the run ends KILLED), 1 anything else (the run ends FAILED).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
import textwrap
import traceback
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from stages.common.config import ConfigError, apply_overrides, load_config, validate
from stages.common.runtime import (
    TRACKING_RETRY_ENV,
    Terminated,
    acknowledge_stop,
    prepare_process,
    raise_on_signals,
)

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_DIGEST = 0, 1, 2, 3


def describe_config(model: type[BaseModel], prefix: str = "") -> list[str]:
    """One entry per config field (nested models flattened to dotted paths): type, default, doc."""
    lines = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        ann = field.annotation
        nested = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if nested is None:  # Optional[Model] -> Model
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
                nested = args[0]
        type_name = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
        type_name = re.sub(r"Annotated\[(.*), FieldInfo\(.*?\)\]", r"\1", type_name)
        type_name = re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", type_name)  # stages.curate.config.X -> X
        default = ""
        if not field.is_required() and nested is None:
            value = field.get_default(call_default_factory=True)
            default = f" = {json.dumps(_jsonable(value))}"
        doc = " ".join((field.description or "").split())
        lines.append(f"  {path}: {type_name}{default}")
        if doc:
            lines.extend(textwrap.wrap(doc, width=96, initial_indent="      ", subsequent_indent="      "))
        if nested is not None and not any(n in ("run_id", "artifacts") for n in nested.model_fields):
            lines.extend(describe_config(nested, path + "."))
    return lines


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def exit_now(code: int) -> None:
    """Flush and leave without the interpreter's teardown.

    By the time a stage returns, its MLflow run is closed and its Output written. Tearing down torch,
    transformers and sympy then took 1-7 s (measured, 2 cores), which delays every stage's end and
    stretches a Ctrl-C; nothing left to do needs it.
    """
    # The reader of our output may be gone (the flow was SIGKILLed): flushing must not stop the exit.
    for flush in (logging.shutdown, sys.stdout.flush, sys.stderr.flush):
        with contextlib.suppress(OSError, ValueError):
            flush()
    os._exit(code)


def stage_entrypoint(name: str, config_cls: type, run: Callable[..., Any]) -> None:
    """What `python -m stages.<name>` runs: `stage_main`, then `exit_now` whatever happened."""
    code = EXIT_ERROR
    try:
        code = stage_main(name, config_cls, run)
    except SystemExit as err:  # argparse: --help (0) or bad arguments (2)
        code = err.code if isinstance(err.code, int) else EXIT_ERROR
    except BaseException:
        with contextlib.suppress(OSError):
            traceback.print_exc()
    finally:
        exit_now(code)


def stage_main(name: str, config_cls: type, run: Callable[..., Any], argv: list[str] | None = None) -> int:
    prepare_process()
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.{name}", description=f"Run the {name} stage.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (YAML/JSON keys; nested ones as dotted paths for --set):\n"
               + "\n".join(describe_config(config_cls))
               + "\n\nexit codes: 0 done, 2 bad config, 3 an input artifact failed its digest check, "
                 "130/143 stopped by a signal, 1 anything else")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="YAML/JSON file holding this stage's config")
    src.add_argument("--config-json", help="the stage's config as a JSON string (what containers are given)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set seed=3 (repeatable)")
    parser.add_argument("--output", help="also write the stage's Output (run id, artifact URIs, digests) here")
    parser.add_argument("--parent-run-id", help="MLflow run id of the pipeline run this stage belongs to")
    parser.add_argument("--run-id", help="an existing RUNNING MLflow run to log into (the flow creates one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    try:
        if args.config:
            config = load_config(config_cls, args.config, args.overrides)
        else:
            try:
                data = json.loads(args.config_json)
            except json.JSONDecodeError as err:
                raise ConfigError(f"--config-json: not JSON ({err})") from None
            if not isinstance(data, dict):
                raise ConfigError("--config-json: must be a JSON object")
            config = validate(config_cls, apply_overrides(data, args.overrides), "--config-json")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    raise_on_signals(signal.SIGTERM, signal.SIGINT)
    try:
        from stages.common.rank import follow_stage, this_node_rank

        if this_node_rank() > 0:  # a node of a multi-node stage other than 0, which runs the stage itself
            return EXIT_OK if follow_stage(name, config, args.run_id) == 0 else EXIT_ERROR
        output = run(config, parent_run_id=args.parent_run_id, run_id=args.run_id)
    except Terminated as err:
        acknowledge_stop()
        print(f"{name}: stopped, {err}", file=sys.stderr)
        return 128 + err.signum
    except ConfigError as err:  # runtime checks that depend on data (a prompt too long, say)
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as err:
        from stages.common.tracking import (  # MLflow: only once a run started
            DigestMismatchError,
            tracking_server_down,
            tracking_uri,
        )

        if isinstance(err, DigestMismatchError):
            print(f"error: {err}", file=sys.stderr)
            return EXIT_DIGEST
        traceback.print_exc()
        if tracking_server_down():
            print(f"error: {name}: the MLflow tracking server {tracking_uri()} does not answer (its calls were "
                  f"retried for up to {os.environ.get(TRACKING_RETRY_ENV)} s: flow.tracking_retry_seconds); its run "
                  "stays RUNNING until the flow, or the next `ufo` command, closes it once the server is back",
                  file=sys.stderr)
        return EXIT_ERROR
    if args.output:
        from stages.common.tracking import write_json_atomic

        write_json_atomic(args.output, output.model_dump(mode="json"))
    print(f"{name}: done, MLflow run {output.run_id}")
    return EXIT_OK
