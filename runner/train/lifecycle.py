"""This rank's record of itself and its answer to a stop request.

Every rank writes `ranks/<rank>.json` in the run directory: its pid and host when it starts, the signal it received,
the error it raised, and how it ended; the driver reads these to say which rank failed and how (a rank killed by
the kernel or a scheduler leaves no ending).

A stop is requested by SIGTERM / SIGINT / SIGUSR1 to a rank (a scheduler preempting the job sends SIGTERM to every
process), or by the driver writing `STOP` in the run directory (its answer to Ctrl-C or to SIGTERM of its own). The
ranks agree on it at the end of each step (an all-reduce of one flag), save a checkpoint at that step and exit
cleanly. A rank that cannot finish its step within `GRACE_S` (its peers are gone) exits on its own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

from runner.train.engine import Dist

GRACE_S = 25.0  # less than DeepSpeed's launcher waits (30 s) before it kills what is left
_CURRENT: Lifecycle | None = None


def start(run_dir: Path, dist: Dist) -> Lifecycle:
    """This rank's lifecycle, started by the worker before anything else."""
    global _CURRENT
    _CURRENT = Lifecycle(run_dir, dist)
    return _CURRENT


def current() -> Lifecycle:
    assert _CURRENT is not None, "runner.worker starts the rank's lifecycle before any recipe runs"
    return _CURRENT


class Lifecycle:
    def __init__(self, run_dir: Path, dist: Dist):
        self.run_dir, self.dist = run_dir, dist
        self.path = run_dir / "ranks" / f"{dist.rank}.json"
        self.path.parent.mkdir(exist_ok=True)
        self.record = {
            "rank": dist.rank,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "state": "running",
            "started": time.time(),
        }
        self._write()
        self.requested = None  # the signal (or "STOP file") that asked this rank to stop
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        previous = sys.excepthook

        def excepthook(kind, value, tb):
            self.end("failed", error=(traceback.format_exception_only(kind, value)[-1]).strip())
            previous(kind, value, tb)

        sys.excepthook = excepthook
        driver = os.environ.get("RUNNER_DRIVER_PID")
        if driver and os.environ.get("RUNNER_DRIVER_HOST") == socket.gethostname():
            threading.Thread(target=self._watch_driver, args=(int(driver),), daemon=True).start()

    def _write(self) -> None:
        try:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.record))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a full disk must not hide the training error behind this one

    def _on_signal(self, signum, frame) -> None:
        if self.requested is not None:  # a second signal: stop now
            self.end("aborted", signal=signal.Signals(signum).name)
            os._exit(128 + signum)
        self.requested = signal.Signals(signum).name
        self.record["signal"] = self.requested
        self._write()
        threading.Thread(target=self._watchdog, args=(signum,), daemon=True).start()

    def _watch_driver(self, pid: int) -> None:
        """A driver that is gone (killed with SIGKILL, its terminal closed) cannot supervise: stop as if asked to."""
        while self.requested is None:
            time.sleep(2.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                self.requested = "the driver is gone"
                self.record["signal"] = self.requested
                self._write()
            except PermissionError:
                pass

    def _watchdog(self, signum: int) -> None:
        time.sleep(GRACE_S)
        self.end("aborted", signal=signal.Signals(signum).name, note=f"did not finish its step in {GRACE_S:.0f} s")
        os._exit(128 + signum)

    def should_stop(self) -> bool:
        """Whether the ranks stop after this step (every rank calls it at the same point; the answer is the same)."""
        local = self.requested is not None
        if not local and self.dist.main and (self.run_dir / "STOP").exists():
            self.requested, local = "STOP", True
        if self.dist.world == 1:
            return local
        from runner.train.engine import all_reduce_sum

        return all_reduce_sum([float(local)], self.dist.device)[0] > 0

    def end(self, state: str, **extra) -> None:
        self.record.update(state=state, ended=time.time(), **extra)
        self._write()
