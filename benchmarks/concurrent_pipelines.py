"""Several pipelines at once on the team stack: N smoke pipelines started together with the docker launcher,
against one pipeline alone, on the same stack.

It starts its own stack (`ufo stack up --pool ufo-docker`, free ports, a temporary workspace), builds nothing
(run `ufo images` first), then:
  1. one smoke pipeline alone (seed 100), timed;
  2. N smoke pipelines started at the same moment (seeds 101..100+N, each its own workspace, as N users of
     the stack would; distinct seeds so that no stage is a cache hit), timed from start to the last exit.
Then checks what the issue asks: every pipeline exited 0 and its pipeline run and four stage runs are
FINISHED; no MLflow run is left RUNNING; no server log (PostgreSQL, MLflow, Prefect, the worker) gained an
ERROR or a Traceback line while they ran (PostgreSQL's unique-key errors that MLflow and Prefect expect and
handle are counted apart, by constraint). Prints the wall times and their ratio, and stops the stack.

    .venv/bin/python benchmarks/concurrent_pipelines.py [--n 4] [--config configs/smoke.yaml]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.common.processes import free_port  # noqa: E402

ERROR_LINE = re.compile(r"\bERROR\b|Traceback|\bFATAL\b|\bPANIC\b")


def ufo(env: dict[str, str], *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, **kwargs)


def start(env: dict[str, str], home: Path, config: str, seed: int) -> subprocess.Popen:
    home.mkdir(parents=True, exist_ok=True)
    out = open(home / "ufo.log", "w")  # noqa: SIM115 -- the child's
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", config, "--set", "flow.launcher=docker",
                             "--set", f"seed={seed}"], cwd=REPO, env={**env, "UFO_HOME": str(home)},
                            stdout=out, stderr=subprocess.STDOUT)


def log_sizes(stack: Path) -> dict[Path, int]:
    from flows.postgres import pg_home

    logs = [*stack.glob("*.log"), pg_home(stack) / "postgres.log"]
    return {p: p.stat().st_size for p in logs if p.is_file()}


def new_errors(before: dict[Path, int]) -> list[str]:
    found = []
    for path, size in before.items():
        with open(path, "rb") as f:
            f.seek(size)
            found += [f"{path.name}: {line}" for line in f.read().decode(errors="replace").splitlines()
                      if ERROR_LINE.search(line)]
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--config", default="configs/smoke.yaml")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ufo-concurrent-"))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env = {**base, "UFO_HOME": str(root / "stack-home")}
    up = ufo(env, "stack", "up", "--pool", "ufo-docker", "--pool-type", "docker", "--mlflow-port", str(free_port()),
             "--prefect-port", str(free_port()), "--postgres-port", str(free_port()), timeout=600)
    if up.returncode:
        print(up.stdout + up.stderr)
        return 1
    try:
        for line in (root / "stack-home" / "stack" / "env.sh").read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = shlex.split(value)[0]
        stack = root / "stack-home" / "stack"
        before = log_sizes(stack)

        t0 = time.monotonic()
        alone = start(env, root / "alone", args.config, 100)
        alone_code = alone.wait()
        t_alone = time.monotonic() - t0

        t0 = time.monotonic()
        procs = [start(env, root / f"user{k}", args.config, 101 + k) for k in range(args.n)]
        codes = [proc.wait() for proc in procs]
        t_all = time.monotonic() - t0

        import mlflow

        os.environ.update({k: v for k, v in env.items() if k.startswith(("MLFLOW_", "PREFECT_"))})
        runs = mlflow.search_runs(experiment_names=["ufo-smoke"], output_format="list")
        pipelines = [r for r in runs if r.data.tags.get("ufo.kind") == "pipeline"]
        by_status: dict[str, int] = {}
        for r in runs:
            by_status[r.info.status] = by_status.get(r.info.status, 0) + 1
        found = new_errors(before)
        # PostgreSQL logs every failed statement, also those its clients expect and handle: MLflow inserts
        # a run's step-0 metrics again when a model is logged (and takes the unique-key error as "already
        # there"), Prefect inserts a task run it may already have. Counted apart, by constraint.
        handled = [e for e in found if e.startswith("postgres.log") and "violates unique constraint" in e]
        errors = [e for e in found if e not in handled]
        constraints: dict[str, int] = {}
        for e in handled:
            name = e.rsplit('"', 2)[-2]
            constraints[name] = constraints.get(name, 0) + 1
        print(f"one pipeline alone: {t_alone:.0f} s (exit {alone_code})")
        print(f"{args.n} pipelines at once: {t_all:.0f} s to the last exit (exits {codes}); "
              f"{t_all / t_alone:.2f}x the time of one, {args.n * t_alone / t_all:.2f}x its throughput")
        print(f"MLflow: {len(pipelines)} pipeline runs, {len(runs)} runs in all, by status {by_status}")
        print(f"PostgreSQL unique-key errors its clients handle, by constraint: {constraints or 'none'}")
        print(f"other server log lines with ERROR/Traceback/FATAL/PANIC while they ran: {len(errors)}")
        for line in errors[:20]:
            print("  " + line[:300])
        for k, code in enumerate(codes):
            if code:
                print(f"user{k} failed:\n" + (root / f"user{k}" / "ufo.log").read_text()[-3000:])
        ok = (alone_code == 0 and not any(codes) and len(pipelines) == args.n + 1
              and by_status == {"FINISHED": len(runs)} and len(runs) == 5 * (args.n + 1) and not errors)
        print("all FINISHED, none left RUNNING, no server error" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        down = ufo({**base, "UFO_HOME": str(root / "stack-home")}, "stack", "down", timeout=300)
        print(down.stdout.strip())


if __name__ == "__main__":
    sys.exit(main())
