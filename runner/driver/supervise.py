"""Running the launcher and watching it: its output to launch.log and what the ranks mark for the user to the console
(runner.driver.console), a stop request passed on to the
ranks (the first Ctrl-C or SIGTERM: they finish the step, save a checkpoint and exit; the second: everything is
killed at once), and, when it fails, which rank failed and how.

The launcher runs in its own session, so that a Ctrl-C in the terminal reaches the driver alone and the driver
decides what the ranks do. Under SLURM (submitit), the timeout signal the job receives first stops the ranks
gracefully and then goes to submitit's own handler, which requeues the job.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from runner.driver import finish
from runner.driver.console import Console

ERROR_LINE = re.compile(r"(Error|error:|Killed|out of memory|OOM|Traceback)")
RETURN_CODE = re.compile(r"exits with return code = (-?\d+)")
SECONDARY = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL", "gloo", "Timed out")


@dataclasses.dataclass
class Outcome:
    rc: int
    reason: str = ""
    stop_requested: str | None = None  # the signal that asked the run to stop (SIGINT / SIGTERM / SIGUSR2)
    aborted: bool = False  # a second signal killed everything
    log_lost: str | None = None  # why launch.log is incomplete (a full disk)
    last_lines: list[str] = dataclasses.field(default_factory=list)  # what a failed run printed last (its traceback)


class _Stopper:
    """The driver's signal handlers while the launcher runs."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)

    def __init__(self, run_dir: Path):
        self.run_dir, self.proc, self.requested, self.aborted = run_dir, None, None, False
        self.previous = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
        for sig in self.SIGNALS:
            signal.signal(sig, self.handle)

    def handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
            try:
                (self.run_dir / "STOP").write_text(f"{name} to the driver at {time.ctime()}\n")
            except OSError:
                pass
            print(
                f"\n{name}: the ranks finish their step, save a checkpoint and stop "
                f"({'Ctrl-C' if signum == signal.SIGINT else 'the same signal'} again to stop at once)",
                file=sys.stderr,
                flush=True,
            )
        elif self.proc is not None and not self.aborted:
            self.aborted = True
            print(f"\n{name} again: killing the ranks now", file=sys.stderr, flush=True)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        (self.run_dir / "STOP").unlink(missing_ok=True)
        chained = self.previous.get(signal.SIGUSR2)
        if self.requested == "SIGUSR2" and callable(chained):  # submitit: checkpoint done, now requeue the job
            chained(signal.SIGUSR2, None)


def resolve(cmd: list[str], env: dict) -> tuple[list[str] | None, dict]:
    """The launcher (`deepspeed`, `torchrun`) from PATH, else from beside this Python (a virtualenv used without
    activating it), with that directory put first on the ranks' PATH; None when it is in neither."""
    if shutil.which(cmd[0], path=env.get("PATH")):
        return cmd, env
    beside = Path(sys.executable).parent / cmd[0]
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside), *cmd[1:]], {
            **env,
            "PATH": os.pathsep.join(filter(None, [str(beside.parent), env.get("PATH")])),
        }
    return None, env


def launch(cmd: list[str], env: dict, run_dir: Path, header: str) -> Outcome:
    """Run the launcher, appending its output to launch.log and drawing the console from it; return how it ended."""
    cmd, env = resolve(cmd, env)
    if cmd is None:
        return Outcome(127, "the launcher was not found on PATH: activate the environment runner is installed in")
    log_path, lost, last_error, codes = run_dir / "launch.log", None, "", []
    stopper, screen = _Stopper(run_dir), Console()
    try:
        log = open(log_path, "a")
        log.write(header + "\n")
    except OSError as exc:
        log, lost = None, exc.strerror
    try:
        with subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True
        ) as proc:
            stopper.proc = proc
            early = finish.EarlyFinish(run_dir, proc)
            for line in proc.stdout:
                if log is not None:
                    try:
                        log.write(line)
                    except OSError as exc:  # the disk is full: the console shows everything, and says so at the end
                        lost = exc.strerror if exc.errno != errno.ENOSPC else "no space left on device"
                        log = None
                screen.feed(line, echo=log is None)
                if ERROR_LINE.search(line) and "Traceback" not in line:
                    last_error = line.strip().removeprefix("[rank0]: ").removeprefix("[rank1]: ")
                codes += [int(c) for c in RETURN_CODE.findall(line)]
            rc = proc.wait()
            if early.fired:  # every rank had ended cleanly and exited: the launcher was only winding down
                rc = 0
            if rc != 0:  # a launcher that died leaves no rank of its session behind
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
    finally:
        screen.close()
        stopper.restore()
        if log is not None:
            try:
                log.close()
            except OSError as exc:
                lost = exc.strerror
    reason = "" if rc == 0 else diagnose(run_dir, last_error, codes)
    return Outcome(rc, reason, stopper.requested, stopper.aborted, lost, screen.failure() if rc else [])


def rank_records(run_dir: Path) -> list[dict]:
    records = []
    for path in sorted((run_dir / "ranks").glob("*.json"), key=lambda p: int(p.stem)):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass
    return records


def diagnose(run_dir: Path, last_error: str, codes: list[int]) -> str:
    """Which rank failed and how: a rank's own error (not a peer's lost connection, which follows from it), or a
    rank that ended without a word (killed: by the kernel's OOM killer, a scheduler or kill -9)."""
    records = rank_records(run_dir)
    killed = [r for r in records if r.get("state") == "running" and not r.get("signal")]
    signal_rc = next((-c for c in codes if c < 0), None)
    how = (
        f"by {signal.Signals(signal_rc).name}"
        if signal_rc and signal_rc in signal.Signals._value2member_map_
        else "without an error"
    )
    if killed:
        who = ", ".join(f"rank {r['rank']} (pid {r['pid']} on {r['host']})" for r in killed)
        after = "; the other ranks stopped after it" if len(records) > len(killed) else ""
        return f"{who} was killed {how} (out of memory, or killed from outside){after}"
    failed = [r for r in records if r.get("error")]
    primary = [r for r in failed if not any(s in r["error"] for s in SECONDARY)] or failed
    if primary:
        r = primary[0]
        return f"rank {r['rank']} failed: {r['error'][:300]}"
    return last_error[:300] or "no error line in the output"
