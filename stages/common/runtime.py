"""Process runtime shared by every stage: how a stage process stops on a signal, and how many CPU
threads it uses.

Imports nothing heavy: `prepare_process()` must run before torch is imported, because the OpenMP
wait policy is read once, when torch's OpenMP runtime starts.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM (or SIGINT) to stop.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it; the stage's
    run then ends KILLED (see `tracking.run_stage`) instead of the process vanishing mid-write.
    """

    def __init__(self, signum: int):
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


#: How often `Terminated` is raised again until the stage acknowledges it (`acknowledge_stop`).
RETRY_SECONDS = 0.5


def raise_on_signals(*signums: int) -> None:
    """Turn the given signals into `Terminated` in the main thread (only the main thread may call this).

    The exception lands at whatever bytecode runs when the signal arrives. Where that is a callback
    whose exceptions Python ignores (a weakref or `__del__` callback: seen in ThreadPoolExecutor's,
    which printed "Exception ignored" and let SFT train on until the launcher's SIGKILL), it is lost.
    So it is raised again every RETRY_SECONDS (SIGALRM) until the code that catches it calls
    `acknowledge_stop()`.
    """

    def handler(signum, _frame):
        global _stop_signal
        # Raise once per signal: a second SIGTERM during the cleanup must not interrupt the cleanup.
        for s in signums:
            signal.signal(s, signal.SIG_IGN)
        _stop_signal = signum
        signal.signal(signal.SIGALRM, retry)
        signal.setitimer(signal.ITIMER_REAL, RETRY_SECONDS, RETRY_SECONDS)
        raise Terminated(signum)

    def retry(_signum, _frame):
        if _stop_signal is not None:
            raise Terminated(_stop_signal)

    def unraisable(info) -> None:
        # The lost Terminated itself: `retry` raises it again; Python's report of it would read as a crash.
        if not isinstance(info.exc_value, Terminated):
            default_unraisable(info)

    default_unraisable = sys.unraisablehook
    sys.unraisablehook = unraisable
    for s in signums:
        signal.signal(s, handler)


def acknowledge_stop() -> None:
    """The `Terminated` of `raise_on_signals` was caught: stop raising it again, so cleanup can run."""
    signal.setitimer(signal.ITIMER_REAL, 0)


_stop_signal: int | None = None


def request_stop_on_signals(*signums: int) -> None:
    """Record the given signals instead of acting on them at once (main thread only).

    For the `ufo` process: an exception raised from a signal handler lands at an arbitrary bytecode,
    possibly inside a library holding a lock, which can deadlock the very cleanup it should start
    (seen with Prefect's client). Instead the handler only records the request, and the loops that
    wait on stages (`check_stop()`) raise `Terminated` at a point where that is safe.
    """

    def handler(signum, _frame):
        global _stop_signal
        if _stop_signal is None:
            _stop_signal = signum

    for s in signums:
        signal.signal(s, handler)


def stop_requested() -> int | None:
    """The signal that asked this process to stop, or None."""
    return _stop_signal


def check_stop() -> None:
    """Raise `Terminated` if a stop was requested: call it in every loop that waits on something."""
    if _stop_signal is not None:
        raise Terminated(_stop_signal)


FAILPOINT_ENV = "UFO_FAILPOINT"


def failpoint(name: str) -> None:
    """A fault-injection point for the fault tests (like etcd's gofail or TiKV's fail-rs).

    With `UFO_FAILPOINT=<name>=hang` the process sleeps here forever without printing (a deadlocked
    collective, a read that never returns); with `<name>=exit:<code>` it dies at once without
    cleaning up (an OOM kill). Unset, it costs one dictionary lookup.
    """
    spec = os.environ.get(FAILPOINT_ENV)
    if not spec or not spec.startswith(name + "="):
        return
    action = spec.split("=", 1)[1]
    if action == "hang":
        while True:
            time.sleep(3600)
    if action.startswith("exit:"):
        os._exit(int(action.removeprefix("exit:")))


def cpu_budget() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota (what
    `docker run --cpus` and Kubernetes CPU limits set, invisible to `os.cpu_count()`)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _cgroup_cpu_quota() -> float | None:
    v2 = Path("/sys/fs/cgroup/cpu.max")
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        q = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
        if q.is_file():
            quota_us = int(q.read_text())
            period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
    return None


def prepare_process() -> None:
    """Call first thing in a stage process, before torch is imported.

    OpenMP threads that finish early spin-wait for the others by default (OMP_WAIT_POLICY=ACTIVE in
    practice). On a machine shared with other CPU-bound processes a spinning thread burns the core a
    descheduled sibling needs, and a step slows down 10-30x instead of ~2x (measured on 2 cores;
    see benchmarks/cpu_contention.py). PASSIVE makes waiting threads sleep.

    Also: the credentials a launcher mounted (`load_secrets_file`) and the bound on MLflow's retries
    (`bound_tracking_retries`).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    load_secrets_file()
    bound_tracking_retries()


#: A file of KEY=VALUE lines (credentials) that a launcher mounted into the stage's container.
SECRETS_FILE_ENV = "UFO_SECRETS_FILE"
#: Where a container finds it when $UFO_SECRETS_FILE is unset: the Docker launcher and the stack's Docker
#: work pool mount it there, and a Kubernetes pod mounts its Secret there (infra/README.md, "Credentials").
SECRETS_FILE_IN_CONTAINER = "/run/secrets/ufo/credentials"


def load_secrets_file() -> list[str]:
    """Put the credentials in `$UFO_SECRETS_FILE` (else `SECRETS_FILE_IN_CONTAINER`, if there is one) into
    this process's environment where unset, where MLflow's client reads them (MLFLOW_TRACKING_USERNAME,
    MLFLOW_TRACKING_PASSWORD); return their names (never the values: they are not to be logged).

    A mounted file rather than environment variables: Docker shows a container's environment to anyone
    who may run `docker inspect`, and keeps it with the container's configuration.
    """
    path = os.environ.get(SECRETS_FILE_ENV)
    if not path:
        if not Path(SECRETS_FILE_IN_CONTAINER).is_file():
            return []
        path = SECRETS_FILE_IN_CONTAINER
    names = []
    for line in Path(path).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            os.environ.setdefault(key.strip(), value)
            names.append(key.strip())
    return names


#: How long MLflow calls keep retrying an unreachable tracking server (seconds); `flow.tracking_retry_seconds`.
TRACKING_RETRY_ENV = "UFO_TRACKING_RETRY_SECONDS"
DEFAULT_TRACKING_RETRY_SECONDS = 180.0
#: MLflow's own caps on its retry settings (mlflow.environment_variables), and urllib3's on one backoff.
_MAX_RETRIES, _MAX_FACTOR, _MAX_BACKOFF = 10, 120, 120


def bound_tracking_retries(seconds: float | None = None) -> tuple[int, int]:
    """Make each MLflow call of this process, and of the processes it starts, give up on an unreachable
    tracking server after at most `seconds` of retrying (default: $UFO_TRACKING_RETRY_SECONDS, else 180).

    MLflow retries a refused connection with urllib3's exponential backoff: after the n-th failed attempt
    (n >= 2) it sleeps min(factor * 2**(n-1), 120) s (+ up to 1 s of jitter). Its defaults (7 retries,
    factor 2) wait 244 s per call, and a stage makes many calls: a stage whose server died began a fresh
    cycle after each (seen: no end after 341 s). This picks the (retries, factor) whose total wait comes
    near `seconds` without going over (the most attempts among those within 80% of it), and sets MLFLOW_HTTP_REQUEST_MAX_RETRIES and _BACKOFF_FACTOR;
    `stages.common.tracking` then skips its own cleanup calls once the server is known to be down. A server
    that accepts connections but never answers adds MLFLOW_HTTP_REQUEST_TIMEOUT (120 s) per attempt.

    Returns:
        (retries, factor).
    """
    if seconds is None:
        seconds = float(os.environ.get(TRACKING_RETRY_ENV) or DEFAULT_TRACKING_RETRY_SECONDS)
    best = (False, 0, 0.0, 1)
    for factor in range(1, _MAX_FACTOR + 1):
        for retries in range(_MAX_RETRIES + 1):
            total = sum(min(factor * 2 ** (n - 1), _MAX_BACKOFF) + 1 for n in range(2, retries + 1))
            # within the budget; near it (>= 80%), then as many attempts as possible (a server that is
            # back is noticed sooner), then as close as possible
            key = (total >= 0.8 * seconds, retries, total, factor)
            if total <= seconds and key[:3] > best[:3]:
                best = key
    _near, retries, _total, factor = best
    os.environ[TRACKING_RETRY_ENV] = f"{seconds:g}"
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = str(factor)
    return retries, factor


def set_cpu_threads() -> int:
    """Size torch's intra-op pool to the CPUs this process may use (`UFO_THREADS` overrides)."""
    import torch

    n = int(os.environ.get("UFO_THREADS") or cpu_budget())
    torch.set_num_threads(n)
    return n
