"""`ufo stack status | restart | up | down` on a stack whose servers die: a real stack (PostgreSQL, MLflow's
basic-auth server, Prefect's server, a process work pool and its worker) in a temporary workspace, shared by
the module (its start: ~30-60 s on a busy machine). Servers are killed the hard way (SIGKILL), as the
kernel's OOM killer or a careless `kill -9` would, and what `ufo stack` reports and does about it is
checked against the process table and the servers' answers. The last test leaves MLflow's workers without
their leader and checks that `ufo stack down` still leaves no process behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

import pytest

from flows.postgres import pg_home, postgres_pid
from stages.common.processes import alive, free_port, group_members, start_time
from tests.helpers import Stack, http_status, processes_of

pytestmark = pytest.mark.stack

POOL = "ufo-proc"
WORKER = f"worker-{POOL}"


@dataclass(frozen=True)
class Row:
    state: str
    pid: int | None
    url: str


def _status(stack: Stack) -> dict[str, Row]:
    """`ufo stack status`, read by its header's column positions (so a row that is not aligned fails)."""
    out = stack.ufo("stack", "status", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    header, *lines = out.stdout.splitlines()
    starts = [header.index(column) for column in ("SERVER", "STATE", "PID", "URL")]
    rows = {}
    for line in lines:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        aligned = all(line[s - 1] == " " and line[s] != " " for s in starts[1:])
        assert aligned and all(cells), f"not aligned under the header:\n{header}\n{line}"
        rows[cells[0]] = Row(cells[1], None if cells[2] == "-" else int(cells[2]), cells[3])
    return rows


def _refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def _wait(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {seconds:g} s")
        time.sleep(0.2)


def _kill_leader(pid: int) -> list[int]:
    """SIGKILL `pid` alone; the rest of its process group, which lives on."""
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: not alive(pid), 30, f"{pid} not gone after SIGKILL")
    left = group_members(pid)
    assert left, f"no process of group {pid} outlived its leader: this test needs MLflow's uvicorn workers"
    return left


def test_down_spares_a_stranger_that_was_handed_a_dead_servers_pid(tmp_path):
    """Once a server's whole group has exited, its pid may lead an unrelated session: its start time tells."""
    stranger = subprocess.Popen(["sleep", "120"], start_new_session=True)  # leads a group, as a daemon would
    try:
        folder = tmp_path / "stack"
        folder.mkdir()
        state = {"layout": {"host": "127.0.0.1", "mlflow_port": 1, "prefect_port": 2, "postgres_port": 3},
                 "processes": {"mlflow": stranger.pid}, "start_times": {"mlflow": start_time(stranger.pid) - 1}}
        (folder / "stack.json").write_text(json.dumps(state))
        s = Stack(tmp_path)
        assert _status(s)["mlflow"] == Row("stopped", None, "http://127.0.0.1:1")
        down = s.ufo("stack", "down", timeout=120)
        assert down.stdout.strip() == "stopped: nothing was running" and alive(stranger.pid), down.stdout + down.stderr
        # The same entry with the stranger's own start time is the server's: `down` stops it.
        state["start_times"]["mlflow"] += 1
        (folder / "stack.json").write_text(json.dumps(state))
        assert _status(s)["mlflow"] == Row("running", stranger.pid, "http://127.0.0.1:1")
        down = s.ufo("stack", "down", timeout=120)
        assert down.stdout.strip() == "stopped: mlflow", down.stdout + down.stderr
        assert stranger.wait(timeout=30) == -signal.SIGTERM
    finally:
        stranger.kill()
        stranger.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("servers-stack"))
    s.mlflow_port, prefect_port, pg_port = (free_port() for _ in range(3))
    s.up_args = ("stack", "up", "--pool", POOL, "--pool-type", "process", "--mlflow-port", str(s.mlflow_port),
                 "--prefect-port", str(prefect_port), "--postgres-port", str(pg_port))
    try:
        up = s.ufo(*s.up_args, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        s.exported = s.load_env()
        yield s
    finally:
        down = s.ufo("stack", "down", timeout=300)
        left = processes_of(s.home)
        pg_left = postgres_pid(s.home / "stack")
        if pg_home(s.home / "stack").is_relative_to("/var/tmp"):  # root: the cluster lives outside the workspace
            shutil.rmtree(pg_home(s.home / "stack"), ignore_errors=True)
        assert down.returncode == 0 and not left and not pg_left, (down.stdout + down.stderr, left)


def test_status_shows_one_aligned_row_per_server(stack):
    rows = _status(stack)
    assert list(rows) == ["postgres", "mlflow", "prefect", WORKER]
    assert {name: row.state for name, row in rows.items()} == dict.fromkeys(rows, "running")
    recorded = json.loads((stack.home / "stack" / "stack.json").read_text())["processes"]
    assert {name: rows[name].pid for name in recorded} == recorded
    assert rows["postgres"].pid == postgres_pid(stack.home / "stack")
    assert all(alive(row.pid) for row in rows.values())
    assert rows["mlflow"].url == stack.exported["MLFLOW_TRACKING_URI"]
    assert rows[WORKER].url == f"pool {POOL} (process)"


def test_restart_mlflow_after_its_leader_died(stack, monkeypatch):
    """Its uvicorn workers outlive a killed leader and keep the port: `restart` stops them and starts MLflow
    anew, and closes a run that an earlier `ufo` journaled as unclosed."""
    import mlflow

    from flows import runs

    uri = stack.exported["MLFLOW_TRACKING_URI"]
    user, password = stack.exported["MLFLOW_TRACKING_USERNAME"], stack.exported["MLFLOW_TRACKING_PASSWORD"]
    # A stage run left RUNNING and journaled, as `ufo run` does when the tracking server did not answer.
    monkeypatch.setenv("UFO_HOME", str(stack.home))
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("servers-check")).info.run_id
    monkeypatch.setattr(runs, "LEDGER", runs.Ledger(opened={run_id: "sft"},
                                                    unclosed={run_id: ("FAILED", "the stage died")}))
    runs.settle(uri, stopped=False)

    leader = _status(stack)["mlflow"].pid
    old = _kill_leader(leader)
    assert http_status(f"{uri}/health") == 200  # the orphans still serve
    row = _status(stack)["mlflow"]
    assert re.fullmatch(r"leader dead, (\d+) process(es)? left", row.state), row.state
    assert int(row.state.split()[2]) == len(group_members(leader)) and row.pid == leader

    restart = stack.ufo("stack", "restart", "mlflow", timeout=300)
    assert restart.returncode == 0, restart.stdout + restart.stderr
    assert re.search(rf"^restarted mlflow: pid \d+, {re.escape(uri)}; before: {row.state} \(pid {leader}\)$",
                     restart.stdout, re.M), restart.stdout
    assert f"closed run: sft {run_id} FAILED" in restart.stdout, restart.stdout
    assert not group_members(leader) and not [pid for pid in old if alive(pid)]
    row = _status(stack)["mlflow"]
    assert row.state == "running" and row.pid != leader and alive(row.pid)
    assert http_status(f"{uri}/health") == 200
    search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_status(search, f"{user}:{password}") == 200
    assert http_status(search) == 401
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["ufo.failure"].startswith("the stage died (closed later")


def test_up_starts_only_the_dead_worker(stack):
    before = _status(stack)
    worker = before[WORKER].pid
    os.killpg(worker, signal.SIGKILL)
    _wait(lambda: not group_members(worker), 30, "the worker's group not gone after SIGKILL")
    assert _status(stack)[WORKER].state == "stopped"

    up = stack.ufo(*stack.up_args, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"started: {WORKER}\n" in up.stdout and "already running: postgres, mlflow, prefect\n" in up.stdout, up.stdout
    after = _status(stack)
    assert after[WORKER].state == "running" and after[WORKER].pid != worker and alive(after[WORKER].pid)
    assert {n: after[n].pid for n in ("postgres", "mlflow", "prefect")} == {
        n: before[n].pid for n in ("postgres", "mlflow", "prefect")}

    again = stack.ufo(*stack.up_args, timeout=300)
    assert again.returncode == 0 and "all running, nothing to start" in again.stdout, again.stdout + again.stderr
    assert {n: r.pid for n, r in _status(stack).items()} == {n: r.pid for n, r in after.items()}


def test_refusals_name_what_is_wrong_and_change_nothing(stack):
    before = {n: r.pid for n, r in _status(stack).items()}
    unknown = stack.ufo("stack", "restart", "mlfow", timeout=120)
    assert unknown.returncode == 2, unknown.stdout + unknown.stderr
    assert "'mlfow'" in unknown.stderr and "postgres, mlflow, prefect, worker" in unknown.stderr, unknown.stderr
    other_port = str(free_port())
    moved = stack.ufo(*stack.up_args[:-1], other_port, timeout=120)  # another --postgres-port
    assert moved.returncode == 2, moved.stdout + moved.stderr
    assert f"(asked: {other_port})" in moved.stderr and "--postgres-port" in moved.stderr, moved.stderr
    assert {n: r.pid for n, r in _status(stack).items()} == before


def test_down_stops_mlflows_orphans_too(stack):
    """Last: MLflow's leader killed again, only its workers left; `down` leaves nothing running."""
    rows = _status(stack)
    leader = rows["mlflow"].pid
    old = _kill_leader(leader)
    down = stack.ufo("stack", "down", timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert down.stdout.strip() == f"stopped: {WORKER}, prefect, mlflow, postgres"
    assert not [pid for pid in old if alive(pid)] and not processes_of(stack.home)
    assert _refuses(stack.mlflow_port)
    assert postgres_pid(stack.home / "stack") is None and not alive(rows["postgres"].pid)
    assert {r.state for r in _status(stack).values()} == {"stopped"}

