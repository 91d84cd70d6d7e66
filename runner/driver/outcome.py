"""How a run ended, recorded: status.json, the console's last words, and the exit code a scheduler acts on
(0: done or stopped at train.stop_at_step; 75: stopped with a checkpoint on request; the launcher's code when it
failed; 130: aborted by a second Ctrl-C)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from runner import manifest
from runner.driver import artifacts, rundir, supervise
from runner.driver.verdict import verdict

PREEMPTED = 75  # EX_TEMPFAIL: stopped with a checkpoint on request; run it again (resume=) to continue


class Ended(SystemExit):
    """A run that did not complete: its exit code, after its status was recorded (in `run_dir`)."""

    def __init__(self, code: int, run_dir: Path | None = None):
        super().__init__(code)
        self.run_dir = run_dir


def record(
    run_dir: Path,
    overrides: list[str],
    outcome: supervise.Outcome,
    wall: float,
    multirun: bool,
    drawing: artifacts.EarlyCurves | None = None,
) -> dict:
    """Write status.json and print how the run ended; return its summary (empty if it has none), or raise Ended.
    `drawing`: curves.png drawn while the launcher wound down (else drawn here)."""
    records = supervise.rank_records(run_dir)
    resume_cmd = f"python -m runner resume={run_dir}"
    if outcome.rc == 0 and "preempted" in {r.get("state") for r in records}:
        step = max(r.get("step", 0) for r in records)
        reason = outcome.stop_requested or "a rank was signalled"
        status(run_dir, "preempted", overrides, step=step, reason=reason, wall_time_s=wall)
        print(f"stopped at step {step} with a checkpoint ({reason}); continue with `{resume_cmd}`", file=sys.stderr)
        raise Ended(PREEMPTED, run_dir)
    if outcome.rc != 0:
        state, disk = ("aborted" if outcome.aborted else "failed"), disk_note(run_dir)
        status(run_dir, state, overrides, reason=f"exit code {outcome.rc}: {outcome.reason}{disk}", wall_time_s=wall)
        if outcome.last_lines and not outcome.aborted:
            print(f"the ranks' last output (all of it: {run_dir / 'launch.log'}):", file=sys.stderr)
            print("".join(f"  | {line}\n" for line in outcome.last_lines), end="", file=sys.stderr)
        print(
            f"error: the launcher exited with code {outcome.rc} after {wall:.0f} s ({outcome.reason}); see "
            f"{run_dir / 'launch.log'}{disk}",
            file=sys.stderr,
        )
        if multirun and not outcome.aborted:
            return {}  # recorded; the sweep goes on
        raise Ended(130 if outcome.aborted else outcome.rc, run_dir)
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    status(run_dir, "completed" if summary else "stopped", overrides, wall_time_s=wall)
    if outcome.log_lost:
        print(f"note: launch.log is incomplete ({outcome.log_lost})", file=sys.stderr)
    print(
        f"done in {wall:.0f} s: summary {path}"
        + (f", model {summary['export_dir']}" if summary.get("export_dir") else "")
    )
    for line in verdict(summary):
        print(line, file=sys.stderr if line.startswith("warning") else sys.stdout)
    for what, write in (
        ("curves", lambda: drawing.result() if drawing else artifacts.curves(run_dir)),
        ("model card", lambda: artifacts.model_card(run_dir, summary)),
    ):
        try:
            write()
        except (OSError, ValueError, KeyError) as exc:  # the run itself is done and recorded
            print(f"note: could not write the {what} ({type(exc).__name__}: {exc})", file=sys.stderr)
    return summary


def status(run_dir: Path, state: str, overrides: list[str], **extra) -> None:
    """status.json, or, when it cannot be written (a full disk), the same on the console."""
    try:
        rundir.write_status(run_dir, state, overrides, **extra)
    except OSError as exc:
        print(
            f"error: could not write {run_dir / 'status.json'} ({exc.strerror}); the run {state}"
            + (f": {extra['reason']}" if extra.get("reason") else ""),
            file=sys.stderr,
        )


def disk_note(run_dir: Path) -> str:
    """A full file system, named, and what of the run it kept ("" when there is room)."""
    free = shutil.disk_usage(run_dir).free
    if free > 64 * 2**20:
        return ""
    tag, _ = manifest.resume_point(run_dir)
    kept = f"the last complete checkpoint, {tag}, is kept" if tag else "no complete checkpoint was saved"
    again = f"; free space and resume with `python -m runner resume={run_dir}`" if tag else "; free space"
    return f"; the file system of {run_dir} is full ({free / 2**20:.1f} MiB free): {kept}{again}"
