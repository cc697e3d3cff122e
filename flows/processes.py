"""Child processes that end when they should: the local stage launcher and the Prefect server use these.

Every child is started in its own session (so a Ctrl-C in the terminal reaches only `ufo`, which then
stops the children in order instead of all of them dying at once) and with a parent-death signal (so
that if `ufo` itself is SIGKILLed, no child outlives it). Stopping is SIGTERM to the child's whole
process group, a grace period, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from stages.common.runtime import check_stop

_PR_SET_PDEATHSIG = 1
_children: weakref.WeakSet[subprocess.Popen] = weakref.WeakSet()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # Not Linux: no parent-death signal, but `stop_group` still stops children on every normal path.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(cmd: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
          output: IO | None = None) -> subprocess.Popen:
    """Start `cmd` in a new session that dies with this process; stdout+stderr go to `output` (a file)
    when given, else to a pipe (read it with `watch`).

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits: callers spawn from the
    thread that also waits for the child (the flow's main thread), never from a short-lived thread.
    """
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, text=True, bufsize=1, start_new_session=True, preexec_fn=_die_with_parent,
        stdout=output if output is not None else subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    _children.add(proc)
    return proc


def stop_all(grace_seconds: float) -> None:
    """Stop every child `spawn` started that is still alive (the last resort of a stopping `ufo`)."""
    for proc in list(_children):
        stop_group(proc, grace_seconds)


def stop_group(proc: subprocess.Popen, grace_seconds: float) -> int:
    """SIGTERM the child's process group, wait up to `grace_seconds`, then SIGKILL it; return the exit code."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_seconds)
    # SIGKILL the group even when the leader exited: its own children (a DeepSpeed rank, a uvicorn
    # worker) may still be alive.
    _signal_group(proc, signal.SIGKILL)
    return proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


@dataclass
class Outcome:
    """How a watched child ended."""

    returncode: int | None
    """Exit code (negative: killed by that signal); None if it never ended by itself."""
    timed_out: bool = False


def line_reader(stream, lines: queue.Queue) -> threading.Thread:
    """Copy `stream`'s lines into `lines` from a daemon thread; a None marks the end of the stream."""

    def pump():
        try:
            for line in stream:
                lines.put(line.rstrip("\n"))
        finally:
            lines.put(None)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


def watch(proc: subprocess.Popen, on_line: Callable[[str], None], *, timeout_seconds: float | None,
          grace_seconds: float) -> Outcome:
    """Relay the child's output line by line and wait for it, enforcing `timeout_seconds` even when the
    child prints nothing. On an interrupt (KeyboardInterrupt, or `Terminated` from a signal handler)
    the child's group is stopped before the interrupt propagates."""
    lines: queue.Queue = queue.Queue()
    eof = proc.stdout is None
    if not eof:
        line_reader(proc.stdout, lines)
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    exited_at = None
    try:
        while True:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                line = ""
            if line is None:
                eof = True
            elif line:
                on_line(line)
            if proc.poll() is not None:
                exited_at = exited_at or time.monotonic()
                # A grandchild may hold the pipe open after the child exited: give its output 2 s.
                if eof or time.monotonic() - exited_at > 2.0:
                    _drain(lines, on_line)
                    return Outcome(proc.returncode)
            check_stop()
            if deadline is not None and time.monotonic() > deadline:
                stop_group(proc, grace_seconds)
                _drain(lines, on_line)
                return Outcome(proc.returncode, timed_out=True)
    except BaseException:
        stop_group(proc, grace_seconds)
        _drain(lines, on_line)
        raise


def _drain(lines: queue.Queue, on_line: Callable[[str], None]) -> None:
    while True:
        try:
            line = lines.get(timeout=0.05)
        except queue.Empty:
            return
        if line is None:
            return
        if line:
            on_line(line)
