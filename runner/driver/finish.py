"""The driver's exit as soon as the ranks have exited, without waiting for the launcher to notice.

DeepSpeed's launcher (`deepspeed.launcher.launch`) polls its ranks once a second and then winds down two Python
processes that imported torch: ~1-2.4 s between the last rank's exit and the driver's, every run. The ranks say
themselves when they are done: each writes `ranks/<rank>.json` with state `completed` (or `stopped`) as its last act
before leaving the process group, and rank 0 writes `summary.json` with the world size. When every rank of this host
has said so and its process has exited (or is a zombie its launcher has not reaped yet), the launcher has nothing left
to do: after a short grace it is terminated and the run counts as succeeded. Ranks on other hosts (multi-node, SLURM)
are not watched: there the launcher's own exit decides, as before.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

DONE = ("completed", "stopped")
GRACE_S = 0.3  # the launcher's own exit, when it comes this soon, is taken instead


def _gone(pid: int) -> bool:
    """The process has exited: no such process, or a zombie (exited, not yet reaped by its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def all_done(run_dir: Path, since: float = 0.0) -> bool:
    """Every rank of the run (summary.json's world size) recorded a clean end on this host and has exited; only
    records and a summary written after `since` count (a resumed run's directory holds its earlier attempt's)."""
    try:
        if (run_dir / "summary.json").stat().st_mtime < since:
            return False
        world = int(json.loads((run_dir / "summary.json").read_text())["world_size"])
        records = [json.loads(p.read_text()) for p in (run_dir / "ranks").glob("*.json")]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    host = socket.gethostname()
    return (
        len(records) == world
        and all(r.get("state") in DONE and r.get("host") == host and r.get("started", 0) >= since for r in records)
        and all(_gone(int(r["pid"])) for r in records)
    )


class EarlyFinish:
    """Watches a running launcher (`proc`, in its own session) and terminates it once the ranks are done; `fired`
    says the launcher's exit status is then not the run's."""

    def __init__(self, run_dir: Path, proc, interval: float = 0.05):
        self.run_dir, self.proc, self.interval, self.fired = run_dir, proc, interval, False
        self.since = time.time()
        self.thread = threading.Thread(target=self._watch, daemon=True, name="early-finish")
        self.thread.start()

    def _watch(self) -> None:
        while self.proc.poll() is None:
            if all_done(self.run_dir, self.since):
                deadline = time.time() + GRACE_S
                while time.time() < deadline and self.proc.poll() is None:
                    time.sleep(0.02)
                if self.proc.poll() is None:
                    self.fired = True
                    try:
                        os.killpg(self.proc.pid, signal.SIGTERM)
                    except (ProcessLookupError, PermissionError):
                        pass
                return
            time.sleep(self.interval)
