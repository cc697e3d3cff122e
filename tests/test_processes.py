"""The one supervision mechanism (stages/common/processes.py) that every launcher, the local Prefect
server, the stack and the rank launcher use: spawn, stop, watch, and how an exit is described. Real
child processes (sh, python), no mocks; each test takes a second or two."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from flows.server import require_tracking_server
from stages.common.config import ConfigError
from stages.common.processes import (
    FORWARDED_ENV,
    REPO_ROOT,
    Group,
    alive,
    describe_exit,
    spawn,
    stage_args,
    stage_command,
    stage_env,
    stop,
    watch,
)
from tests.helpers import gone_within

# A child that ignores SIGTERM: only the SIGKILL after the grace period ends it.
STUBBORN = ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done"]


def test_watch_relays_every_line_and_returns_the_exit_code():
    child = spawn(["sh", "-c", "echo one; echo two >&2; echo three; exit 3"])
    seen: list[str] = []
    outcome = watch(child, seen.append, timeout_seconds=60, grace_seconds=1)
    assert outcome.returncode == 3 and not outcome.timed_out
    assert seen == ["one", "two", "three"]  # stderr joins stdout, in order


def test_a_silent_child_is_stopped_by_its_timeout():
    child = spawn(["sleep", "600"])
    outcome = watch(child, lambda line: None, timeout_seconds=0.5, grace_seconds=1)
    assert outcome.timed_out and outcome.returncode == -signal.SIGTERM
    assert not alive(child.pid)


def test_stop_kills_a_child_that_ignores_sigterm_after_the_grace():
    child = spawn(STUBBORN)
    assert child.lines.get(timeout=30) == "ready"  # the trap is set
    assert child.stop(grace_seconds=0.5) == -signal.SIGKILL


def test_stop_reaches_the_whole_group_even_after_its_leader_exited(tmp_path):
    """A stage's DeepSpeed ranks, a server's workers: children of the child, in its process group."""
    pid_file = tmp_path / "grandchild"
    child = spawn(["sh", "-c", f"sleep 600 & echo $! > {pid_file}; exit 0"], output=None)
    assert child.wait(timeout=30) == 0
    grandchild = int(pid_file.read_text())
    assert alive(grandchild)
    child.stop(grace_seconds=0.5)
    assert gone_within(grandchild, 30)


def test_a_child_dies_with_its_parent_even_when_the_parent_is_sigkilled(tmp_path):
    """`ufo` or a stage SIGKILLed: the kernel sends its children SIGTERM (PR_SET_PDEATHSIG)."""
    script = ("import sys, time; from stages.common.processes import spawn\n"
              "child = spawn(['sleep', '600'], output=None)\n"
              "print(child.pid, flush=True); time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    grandchild = int(parent.stdout.readline())
    assert alive(grandchild)
    parent.kill()
    parent.wait()
    assert gone_within(grandchild, 30)


def test_an_interrupt_while_watching_stops_the_child_before_it_propagates():
    child = spawn(["sh", "-c", "echo started; exec sleep 600"])

    def interrupt(line: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        watch(child, interrupt, timeout_seconds=None, grace_seconds=1)
    assert child.poll() == -signal.SIGTERM


STAGE_STOPPED_WHILE_WATCHING = """
import os, signal, sys, threading
from stages.common.processes import spawn, watch
from stages.common.runtime import Terminated, acknowledge_stop, raise_on_signals

raise_on_signals(signal.SIGTERM)
child = spawn(["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done"])
assert child.lines.get(timeout=30) == "ready"
threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
try:
    watch(child, print, timeout_seconds=None, grace_seconds=2.0)
except Terminated:
    acknowledge_stop()
    print("child", child.poll(), flush=True)
finally:  # should the test fail, leave no child that ignores SIGTERM
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
"""


def test_a_stage_stopped_while_watching_a_child_still_kills_it_after_the_grace():
    """In a stage, Terminated is raised again every 0.5 s until caught (runtime.raise_on_signals); the
    watch loop catches it, so the re-raise cannot cut the 2 s grace short and skip the SIGKILL."""
    proc = subprocess.run([sys.executable, "-c", STAGE_STOPPED_WHILE_WATCHING], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"child {-signal.SIGKILL}", proc.stdout + proc.stderr


def test_a_group_ends_when_every_member_ended_and_relays_their_lines_by_name():
    group = Group({"node 0": spawn(["sh", "-c", "echo a; sleep 0.3; echo b"]),
                   "node 1": spawn(["sh", "-c", "echo c"])})
    seen: list[str] = []
    outcome = watch(group, seen.append, timeout_seconds=60, grace_seconds=1)
    assert outcome.returncode == 0 and not outcome.timed_out and group.failed is None
    assert sorted(seen) == ["[node 0] a", "[node 0] b", "[node 1] c"]
    assert seen.index("[node 0] a") < seen.index("[node 0] b")  # each member's lines in their order


def test_a_group_ends_when_one_member_fails_naming_it_and_stop_stops_the_others():
    """A stage's nodes: one dies, the stage must not wait for the others (they may hang in a collective)."""
    survivor = spawn(STUBBORN)
    assert survivor.lines.get(timeout=30) == "ready"
    group = Group({"node 0": survivor, "node 1": spawn(["sh", "-c", "echo last words; kill -KILL $$"])})
    seen: list[str] = []
    outcome = watch(group, seen.append, timeout_seconds=120, grace_seconds=1)
    assert not outcome.timed_out and outcome.returncode == -signal.SIGKILL
    assert group.failed == "node 1" and list(group.tails["node 1"]) == ["last words"]
    assert alive(survivor.pid)  # watch reports; stopping the rest is the caller's
    group.stop(grace_seconds=0.5)
    assert gone_within(survivor.pid, 10) and survivor.returncode == -signal.SIGKILL


def test_output_held_open_by_a_grandchild_does_not_keep_the_watch_waiting():
    child = spawn(["sh", "-c", "echo before; sleep 600 & exit 0"])
    seen: list[str] = []
    try:
        outcome = watch(child, seen.append, timeout_seconds=120, grace_seconds=1)
        assert outcome.returncode == 0 and not outcome.timed_out and seen == ["before"]
    finally:
        child.stop(grace_seconds=0.5)  # the group: the sleep holding the pipe


def test_stop_of_a_process_that_is_not_ours_polls_it_down():
    """`ufo stack down` stops servers an earlier `ufo stack up` started: only their pids are known."""
    daemon = spawn(STUBBORN, with_parent=False)
    assert daemon.lines.get(timeout=30) == "ready"
    stop(daemon.pid, grace_seconds=0.5)
    assert not alive(daemon.pid)  # exited (a zombie until reaped counts as gone)
    assert daemon.wait(timeout=30) == -signal.SIGKILL


@pytest.mark.parametrize(("code", "text"), [
    (0, "exited with code 0"), (1, "exited with code 1"), (-9, "killed by SIGKILL (exit code -9)"),
    (-15, "killed by SIGTERM (exit code -15)"), (137, "killed by SIGKILL (exit code 137)"),
    (None, "did not exit"),
])
def test_exit_descriptions(code, text):
    assert describe_exit(code) == text


def test_a_stage_command_line_is_what_the_stage_cli_reads(tmp_path):
    """Config as a file (local) or inline JSON (containers, workers), the same run ids either way; and the
    stage parses it (`--help` needs no config, a bad config file is exit 2 before any run starts)."""
    inline = stage_args(config={"seed": 1}, run_id="r1", parent_run_id="p1")
    assert inline == ["--config-json", '{"seed": 1}', "--run-id", "r1", "--parent-run-id", "p1"]
    cmd = stage_command("curate", config_file=tmp_path / "missing.json", run_id="r1", parent_run_id="p1")
    assert cmd[:3] == [sys.executable, "-m", "stages.curate"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=stage_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "missing.json" in proc.stderr, proc.stderr


def test_the_environment_of_a_stage_here_and_elsewhere(monkeypatch):
    monkeypatch.setenv("UFO_THREADS", "1")
    monkeypatch.setenv("PYTHONUNBUFFERED", "0")  # a setting of the user's wins over a default
    here = stage_env()
    assert here["PYTHONPATH"].split(os.pathsep)[0] == str(REPO_ROOT) and here["HOME"] == os.environ["HOME"]
    assert here["PYTHONUNBUFFERED"] == "0" and here["TQDM_DISABLE"] == "1"
    elsewhere = stage_env("http://mlflow:5000", inherit=False)
    assert elsewhere["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and elsewhere["UFO_THREADS"] == "1"
    assert set(elsewhere) <= {"MLFLOW_TRACKING_URI", *FORWARDED_ENV, *here} and "HOME" not in elsewhere
    assert "PYTHONPATH" not in elsewhere  # the image holds the code


@pytest.mark.parametrize("launcher", ["docker", "deployment"])
def test_stages_that_run_elsewhere_need_a_tracking_server(launcher):
    require_tracking_server("http://127.0.0.1:5000", launcher)
    require_tracking_server("sqlite:///x.db", "local")
    with pytest.raises(ConfigError, match=f"flow.launcher: {launcher} runs stages .* sqlite:///x.db; set "
                                          "MLFLOW_TRACKING_URI to an MLflow server"):
        require_tracking_server("sqlite:///x.db", launcher)
