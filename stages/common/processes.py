"""Starting, watching and stopping a process: the one mechanism behind every process this project
supervises, a stage (the local, Docker and deployment launchers in flows/launchers.py, a deployed stage
in flows/stage_flow.py), the local Prefect server and the stack's servers (flows/server.py,
flows/stack.py) and a stage's training ranks (stages/common/rank.py).

- `spawn`: a child in a session of its own (a terminal's Ctrl-C reaches only its parent, which then
  stops its children in order instead of all of them dying at once) that gets SIGTERM when its parent
  dies, even by SIGKILL (Linux PR_SET_PDEATHSIG), so that no child outlives a killed `ufo` or stage.
- `stop`: SIGTERM to the child's process group, a grace period, then SIGKILL to the group.
- `watch`: relay what a `Handle` prints, line by line, until it ends; stop it on a timeout (whether or
  not it prints) and on an interrupt (then the interrupt propagates). A handle is anything that can be
  read, polled and stopped: a `Child` here, a container or a deployment's flow run in flows/launchers.py,
  or a `Group` of them (a stage's nodes), which ends as soon as one member fails.
- `stage_command`, `stage_env` and `node_env`: the command line and environment of `python -m
  stages.<name>` (the arguments stages/common/cli.py reads), wherever the stage runs, and on which node.

Imports only the standard library (and stages.common.runtime, which does too).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from stages.common.runtime import Terminated, acknowledge_stop, check_stop

REPO_ROOT = Path(__file__).resolve().parents[2]
_PR_SET_PDEATHSIG = 1

# ---------------------------------------------------------------------------------------------------
# Spawn and stop


def die_with_parent(parent: int | None = None) -> None:
    """Have this process receive SIGTERM when its parent dies, even by SIGKILL (Linux PR_SET_PDEATHSIG);
    exit at once (143) if the parent is already gone, since then the signal would never come.

    Args:
        parent: the pid the parent had (`spawn` passes its own); None: the parent is gone when this
            process was handed to init (pid 1), which is all a rank started by torchrun can know.
    """
    # Not Linux: no parent-death signal, but `stop` still stops children on every normal path.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    orphaned = os.getppid() != parent if parent is not None else os.getppid() == 1
    if orphaned:
        os._exit(128 + signal.SIGTERM)


class Child:
    """A process started by `spawn`, as `watch` reads it (the `Handle` protocol).

    `lines` receives its output line by line (and a final None) when it writes to a pipe; otherwise
    only the None.
    """

    def __init__(self, proc: subprocess.Popen, group: bool):
        self.proc, self.group = proc, group
        self.lines: queue.Queue[str | None] = queue.Queue()
        if proc.stdout is not None:
            pump_lines(proc.stdout, self.lines)
        else:
            self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def stop(self, grace_seconds: float) -> int:
        """`stop` this child (its whole group when it leads one); return its exit code."""
        stop(self.pid, grace_seconds, group=self.group, exited=self._exited_within)
        return self.proc.wait()

    def _exited_within(self, seconds: float) -> bool:
        try:
            self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return False
        return True


_children: weakref.WeakSet[Child] = weakref.WeakSet()


def spawn(cmd: list[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None,
          output: IO | int | None = subprocess.PIPE, new_session: bool = True,
          with_parent: bool = True) -> Child:
    """Start `cmd`; stdin is /dev/null.

    Args:
        output: `subprocess.PIPE` (read the lines with `watch`), a file for stdout and stderr, or None
            to share this process's stdout and stderr.
        new_session: lead a session and process group of its own, which `stop` signals as a whole.
            False keeps it in this process's group (a stage's rank launcher: the flow's group kill
            reaches the ranks too), and `stop` signals it alone.
        with_parent: die with this process (see `die_with_parent`). PR_SET_PDEATHSIG fires when the
            *thread* that forked the child exits, so spawn from the thread that also waits for the
            child, never from a short-lived one. False only for servers that must outlive their
            starter (`ufo stack up`).
    """
    parent = os.getpid()
    proc = subprocess.Popen(
        cmd, env=env, cwd=None if cwd is None else str(cwd), text=True, bufsize=1, stdin=subprocess.DEVNULL,
        stdout=output, stderr=None if output is None else subprocess.STDOUT, start_new_session=new_session,
        preexec_fn=(lambda: die_with_parent(parent)) if with_parent else None)
    child = Child(proc, group=new_session)
    _children.add(child)
    return child


def stop(pid: int, grace_seconds: float, *, group: bool = True,
         exited: Callable[[float], bool] | None = None) -> None:
    """The one way a process is stopped: SIGTERM, up to `grace_seconds` for it to exit, then SIGKILL.

    Args:
        group: signal the process group `pid` leads, not `pid` alone. Its SIGKILL goes out even when the
            leader exited in time: the leader's own children (a DeepSpeed rank, a uvicorn worker) may
            still be alive.
        exited: waits up to the given seconds and says whether the process has exited (`Child` reaps its
            child there); default: polls the process table, for a process that is not our child (with
            `group`, until no process of the group is left: a leader that died, by SIGKILL say, leaves its
            workers running in its group, and they are stopped the same way).
    """
    exited = exited or (lambda seconds: _await_exit(pid, seconds, group=group))
    send = os.killpg if group else os.kill
    gone = exited(0)
    if not gone:
        _send(send, pid, signal.SIGTERM)
        gone = exited(grace_seconds)
    if group or not gone:  # a lone pid that exited may already belong to another process
        _send(send, pid, signal.SIGKILL)
        exited(5.0)


def _send(send: Callable[[int, int], None], pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        send(pid, sig)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[-1][:1] != "Z"
    except OSError:
        return True


def group_members(pgid: int) -> list[int]:
    """The live processes (not zombies) of process group `pgid`, its leader included if alive.

    A group outlives a leader that died while its children live on, and Linux never hands the leader's
    pid to another process while the group exists: these are the leader's own children.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(") ", 1)[-1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            found.append(int(entry.name))
    return found


def start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot), or None if it is gone: with the pid, it names a
    process for good (a pid alone may be reused once the process has exited)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[-1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _await_exit(pid: int, seconds: float, group: bool = False) -> bool:
    deadline = time.monotonic() + seconds
    while group_members(pid) if group else alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def stop_all(grace_seconds: float) -> None:
    """Stop every child `spawn` started that is still alive (the last resort of a stopping `ufo`)."""
    for child in list(_children):
        child.stop(grace_seconds)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a server or a rank rendezvous)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------
# Watch


class Handle(Protocol):
    """What `watch` needs of the thing it watches: a process, a container, a deployment's flow run."""

    lines: queue.Queue[str | None]
    """Its output, line by line, then None once the output has ended (at once when there is none to relay)."""

    def poll(self) -> int | None:
        """Its exit code once it has ended (negative, or 128+N from a container: killed by signal N), else None."""
        ...

    def stop(self, grace_seconds: float) -> object:
        """SIGTERM (or what stands for it), up to `grace_seconds` to end, then SIGKILL; returns when done."""
        ...


@dataclass(frozen=True)
class Outcome:
    """How a watched handle ended."""

    returncode: int | None
    """Exit code (see `describe_exit`); None if it never ended by itself."""
    timed_out: bool = False


#: Seconds the output of a handle that has ended is still relayed: a grandchild may hold the pipe open.
LINGER_SECONDS = 2.0


def watch(handle: Handle, on_line: Callable[[str], None], *, timeout_seconds: float | None,
          grace_seconds: float, poll_seconds: float = 0.2) -> Outcome:
    """Relay the handle's lines to `on_line` and wait for it to end, polling every `poll_seconds`.

    After `timeout_seconds` it is stopped (`handle.stop(grace_seconds)`) whether or not it prints. On an
    interrupt (KeyboardInterrupt, or `Terminated` from a signal or `check_stop`) it is stopped before the
    interrupt propagates.
    """
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    eof, ended_at = False, None
    try:
        while True:
            eof = _relay(handle.lines, on_line, wait=poll_seconds) or eof
            code = handle.poll()
            if code is not None:
                ended_at = ended_at or time.monotonic()
                if eof or time.monotonic() - ended_at > LINGER_SECONDS:
                    _relay(handle.lines, on_line, wait=0.05, until_empty=True)
                    return Outcome(code)
            check_stop()
            if deadline is not None and time.monotonic() > deadline:
                handle.stop(grace_seconds)
                _relay(handle.lines, on_line, wait=0.05, until_empty=True)
                return Outcome(handle.poll(), timed_out=True)
    except BaseException as err:
        if isinstance(err, Terminated):
            # Caught here: a stage's stop signal is not raised again while the handle is being stopped
            # (runtime.raise_on_signals); it propagates once the handle is down.
            acknowledge_stop()
        handle.stop(grace_seconds)
        _relay(handle.lines, on_line, wait=0.05, until_empty=True)
        raise


def _relay(lines: queue.Queue[str | None], on_line: Callable[[str], None], *, wait: float,
           until_empty: bool = False) -> bool:
    """Relay the next line (waiting up to `wait` for one), or every queued one; True at the end of the output."""
    while True:
        try:
            line = lines.get(timeout=wait)
        except queue.Empty:
            return False
        if line is None:
            return True
        if line:
            on_line(line)
        if not until_empty:
            return False


def pump_lines(stream: Iterable, lines: queue.Queue[str | None], decode: bool = False) -> threading.Thread:
    """Copy `stream`'s lines (text, or with `decode` chunks of bytes) into `lines` from a daemon thread;
    a None marks the end of the stream."""

    def pump():
        buf = b""
        try:
            for item in stream:
                if not decode:
                    lines.put(item.rstrip("\n"))
                    continue
                buf += item
                *done, buf = buf.split(b"\n")
                for raw in done:
                    lines.put(raw.decode(errors="replace"))
        except Exception:  # noqa: S110 -- a broken stream ends the output; how the process ended is polled
            pass
        finally:
            if buf:
                lines.put(buf.decode(errors="replace"))
            lines.put(None)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


class Group:
    """Several handles watched as one (a stage's nodes): their lines relayed as `[name] line`, ended
    when every member ended with 0, or as soon as one ended otherwise; `stop` stops them all at once.

    `failed` then names the member that ended first with a non-zero code, and `tails` keeps each
    member's last lines, for an error message that shows what the failed one printed.
    """

    def __init__(self, members: dict[str, Handle], keep: int = 20):
        self.members = members
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.tails: dict[str, collections.deque[str]] = {n: collections.deque(maxlen=keep) for n in members}
        self.failed: str | None = None
        self._codes: dict[str, int] = {}
        self._open = len(members)
        self._lock = threading.Lock()
        for name, member in members.items():
            threading.Thread(target=self._pump, args=(name, member), daemon=True).start()

    def _pump(self, name: str, member: Handle) -> None:
        while (line := member.lines.get()) is not None:
            if line:
                self.tails[name].append(line)
                self.lines.put(f"[{name}] {line}")
        with self._lock:
            self._open -= 1
            if self._open == 0:
                self.lines.put(None)

    def poll(self) -> int | None:
        ended = {}
        for name, member in self.members.items():
            if name not in self._codes and (code := member.poll()) is not None:
                ended[name] = code
        # Of the members seen failing in the same poll, the one that ended first (a container knows when).
        for name in sorted(ended, key=lambda n: getattr(self.members[n], "ended_at", None) or ""):
            self._codes[name] = ended[name]
            if ended[name] != 0 and self.failed is None:
                self.failed = name
        if self.failed is not None:
            return self._codes[self.failed]
        return 0 if len(self._codes) == len(self.members) else None

    def stop(self, grace_seconds: float) -> None:
        """Stop every member in parallel: all of them get their SIGTERM at once, and the same grace."""
        threads = [threading.Thread(target=m.stop, args=(grace_seconds,)) for m in self.members.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def describe_exit(code: int | None) -> str:
    """`exited with code 1`, `killed by SIGKILL (exit code -9)`; a container reports signal N as 128+N."""
    if code is None:
        return "did not exit"
    signum = -code if code < 0 else code - 128 if code > 128 else None
    if signum:
        try:
            return f"killed by {signal.Signals(signum).name} (exit code {code})"
        except ValueError:
            pass
    return f"exited with code {code}"


# ---------------------------------------------------------------------------------------------------
# A stage's command line and environment

#: Settings of this process that a stage in a container or under a worker must see too.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "UFO_THREADS", "UFO_FAILPOINT")
#: A stage's output is a log stream: unbuffered, without progress bars; and OpenMP threads that wait
#: sleep instead of spinning (see stages/common/runtime.py: prepare_process).
STAGE_ENV_DEFAULTS = {"PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": "PASSIVE",
                      "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                      "TQDM_DISABLE": "1"}


def stage_args(*, run_id: str, parent_run_id: str, config: dict | None = None,
               config_file: str | Path | None = None) -> list[str]:
    """The arguments of `python -m stages.<name>` (stages/common/cli.py): the config as a file or, for a
    stage that reads no host path (a container, a worker), inline as JSON."""
    source = ["--config", str(config_file)] if config_file is not None else ["--config-json", json.dumps(config)]
    return [*source, "--run-id", run_id, "--parent-run-id", parent_run_id]


def stage_command(stage: str, **args) -> list[str]:
    """`python -m stages.<stage> ARGS` with this interpreter (`stage_args` takes `args`)."""
    return [sys.executable, "-m", f"stages.{stage}", *stage_args(**args)]


#: Set on every node of a stage that spans several (engine.nodes > 1, stages/common/rank.py): this node's
#: index, and where node 0 hosts the ranks' rendezvous (a name or address the other nodes reach).
NODE_RANK_ENV, MASTER_ADDR_ENV, MASTER_PORT_ENV = "UFO_NODE_RANK", "MASTER_ADDR", "MASTER_PORT"
DEFAULT_MASTER_PORT = 29500


def node_env(rank: int, master_addr: str, master_port: int = DEFAULT_MASTER_PORT) -> dict[str, str]:
    """The environment that makes a stage process node `rank` of a multi-node stage."""
    return {NODE_RANK_ENV: str(rank), MASTER_ADDR_ENV: master_addr, MASTER_PORT_ENV: str(master_port)}


def stage_env(tracking_uri: str | None = None, *, inherit: bool = True) -> dict[str, str]:
    """The environment of a stage process.

    Args:
        tracking_uri: MLFLOW_TRACKING_URI to set (None: keep this process's).
        inherit: True for a process on this machine: this process's environment with the repository on
            PYTHONPATH. False for a stage elsewhere (a container, a worker): only the tracking URI and
            `FORWARDED_ENV`. Both get `STAGE_ENV_DEFAULTS` where unset.
    """
    if inherit:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    else:
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    if tracking_uri is not None:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return STAGE_ENV_DEFAULTS | env
