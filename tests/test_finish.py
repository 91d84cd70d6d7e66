"""runner.driver.finish: the driver stops waiting for the launcher once every rank has recorded a clean end and
exited; not before, and never for ranks of another host."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

from runner.driver import finish


def _run_dir(tmp_path, states: list[str], host: str | None = None, alive: bool = False):
    (tmp_path / "ranks").mkdir(parents=True)
    (tmp_path / "summary.json").write_text(json.dumps({"world_size": len(states)}))
    procs = []
    for rank, state in enumerate(states):
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)" if alive else "pass"])
        if not alive:
            p.wait()
        procs.append(p)
        record = {"rank": rank, "pid": p.pid, "host": host or socket.gethostname(), "state": state}
        record["started"] = time.time()
        (tmp_path / "ranks" / f"{rank}.json").write_text(json.dumps(record))
    return procs


def _launcher():
    return subprocess.Popen(["sleep", "60"], start_new_session=True)


def test_a_launcher_that_outlives_its_finished_ranks_is_ended(tmp_path):
    launcher = _launcher()
    started = time.time()
    watcher = finish.EarlyFinish(tmp_path, launcher)
    _run_dir(tmp_path, ["completed", "completed"])  # (the ranks' records: written after the launcher started)
    launcher.wait(timeout=10)
    assert watcher.fired and time.time() - started < 2


def test_no_early_end_while_a_rank_runs_has_failed_or_lives_elsewhere(tmp_path):
    cases = {
        "running": dict(states=["completed", "running"]),
        "failed": dict(states=["completed", "failed"]),
        "alive": dict(states=["completed"], alive=True),
        "other host": dict(states=["completed"], host="another-node"),
    }
    for name, kwargs in cases.items():
        procs = _run_dir(tmp_path / name, **kwargs)
        assert not finish.all_done(tmp_path / name), name
        for p in procs:
            p.kill()
            p.wait()
    (tmp_path / "missing").mkdir()
    assert not finish.all_done(tmp_path / "missing")  # no summary yet
    _run_dir(tmp_path / "earlier", ["completed"])
    assert finish.all_done(tmp_path / "earlier") and not finish.all_done(tmp_path / "earlier", since=time.time() + 1)
    launcher = _launcher()
    watcher = finish.EarlyFinish(tmp_path / "running", launcher)
    time.sleep(0.5)
    assert launcher.poll() is None and not watcher.fired
    launcher.kill()
    launcher.wait()
