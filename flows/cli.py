"""`ufo`: the command line.

  ufo run CONFIG [--set a.b=c ...] [--from-run RUN_ID --only STAGE ...]
  ufo config validate CONFIG [--set a.b=c ...]

Configs are validated before anything is created: a bad config exits 2 naming the field path, and no
MLflow run or Prefect flow run exists afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from flows.config import STAGES, PipelineConfig
from stages.common.config import ConfigError, dump_yaml, load_config
from stages.common.tracking import tracking_uri, workspace


def _load(args) -> PipelineConfig:
    return load_config(PipelineConfig, args.config, args.overrides)


def _prepare_environment() -> None:
    """Local defaults for Prefect, set before prefect is imported (it reads settings at import)."""
    ws = workspace()
    (ws / "prefect").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(ws / "prefect"))
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    # The embedded server's first start migrates a new database: over Prefect's 20 s default on a
    # busy 2-core machine (seen here).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def ui_commands() -> list[str]:
    uri = tracking_uri()
    out = []
    if uri.startswith("sqlite:"):
        out.append(f"mlflow ui --backend-store-uri {uri} --port 5000")
    else:
        out.append(f"open {uri} (MLFLOW_TRACKING_URI)")
    if "PREFECT_API_URL" not in os.environ:
        out.append(f"PREFECT_HOME={workspace() / 'prefect'} prefect server start")
    return out


def _reuse_from(run_id: str, only: list[str]) -> dict[str, dict]:
    """Outputs of the stages NOT in `only`, taken from an earlier pipeline run's outputs/<stage>.json."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ConfigError(f"--from-run {run_id}: no such MLflow run in {tracking_uri()}") from None
    if run.data.tags.get("ufo.kind") != "pipeline":
        raise ConfigError(f"--from-run {run_id}: not a pipeline run (tag ufo.kind=pipeline missing)")
    first = min(STAGES.index(s) for s in only)
    reuse = {}
    for name in STAGES[:first]:
        try:
            reuse[name] = mlflow.artifacts.load_dict(f"runs:/{run_id}/outputs/{name}.json")
        except Exception:
            raise ConfigError(f"--from-run {run_id}: it has no finished {name} stage to reuse") from None
    return reuse


def cmd_validate(args) -> int:
    cfg = _load(args)
    print(dump_yaml(cfg), end="")
    print(f"# {args.config}: valid", file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    cfg = _load(args)  # validate before creating anything
    only = args.only or []
    if only and not args.from_run and only[0] != "curate":
        raise ConfigError("--only without --from-run: the first stage to run needs the outputs of an earlier run")
    if only:
        first = min(STAGES.index(s) for s in only)
        only = list(STAGES[first:])  # a rerun stage invalidates everything downstream of it
    reuse = _reuse_from(args.from_run, only) if args.from_run else {}
    _prepare_environment()
    from flows.pipeline import ufo_pipeline  # imports prefect: after the environment is set

    try:
        summary = ufo_pipeline(cfg.model_dump(mode="json"), reuse=reuse)
    except Exception as err:  # a stage failed: its run is marked FAILED, nothing downstream ran
        print(f"error: pipeline failed: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    m = summary["metrics"]
    T = cfg.evaluate.max_turns
    for name in ("sft", "rl"):
        if f"eval/{name}/succ_at_1" in m:
            print(f"{name:>4}: Succ@1 {m[f'eval/{name}/succ_at_1']:.3f}  Succ@{T} {m[f'eval/{name}/succ_at_{T}']:.3f}  "
                  f"Pass@{T} {m[f'eval/{name}/pass_at_{T}']:.3f}  invalid {m[f'eval/{name}/invalid_rate']:.3f}  "
                  f"E/T {m[f'eval/{name}/effective_answer_ratio']:.3f}")
    print("Inspect the runs:\n  " + "\n  ".join(ui_commands()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ufo", description="UFO pipeline: curate -> SFT -> multi-turn RL -> evaluate")
    sub = p.add_subparsers(dest="command", required=True)

    def add_config_args(sp):
        sp.add_argument("config", help="pipeline YAML, e.g. configs/tiny.yaml")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field by its dotted path, e.g. --set rl.max_turns=3 (repeatable)")

    run_p = sub.add_parser("run", help="run the pipeline (Prefect flow, MLflow tracking)")
    add_config_args(run_p)
    run_p.add_argument("--from-run", help="MLflow id of an earlier pipeline run whose stage outputs to reuse")
    run_p.add_argument("--only", action="append", choices=STAGES,
                       help="rerun from this stage on (with --from-run); repeatable")
    run_p.set_defaults(func=cmd_run)

    cfg_p = sub.add_parser("config", help="config tools")
    cfg_sub = cfg_p.add_subparsers(dest="config_command", required=True)
    val_p = cfg_sub.add_parser("validate", help="validate a config and print it resolved")
    add_config_args(val_p)
    val_p.set_defaults(func=cmd_validate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

