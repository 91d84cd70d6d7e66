"""The record a run directory keeps of itself (status.json, with the overrides it ran with, secrets redacted), and
what a run that was started before does on its next attempt: skip (completed with the same overrides), resume
(it has a checkpoint) or start afresh (stale files of the failed attempt removed). Used for sweep points, SLURM
requeues and pipeline stages alike."""

from __future__ import annotations

import json
from pathlib import Path

from runner.overrides import redact

STALE = ("metrics.jsonl", "summary.json", "status.json", "launch.log", "samples.jsonl")  # what an attempt writes


def write_status(run_dir: Path, status: str, overrides: list[str], **extra) -> None:
    """status.json: what happened to this run (completed / stopped / failed / invalid / planned)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "status.json").write_text(
        json.dumps({"status": status, "overrides": redact(overrides), **extra}, indent=2) + "\n"
    )


def finished(run_dir: Path) -> dict | None:
    """The status and summary of a run that completed."""
    path = run_dir / "status.json"
    status = json.loads(path.read_text()) if path.exists() else {}
    if status.get("status") == "completed" and (run_dir / "summary.json").exists():
        return {"status": status, "summary": json.loads((run_dir / "summary.json").read_text())}
    return None


def _comparable(overrides: list[str]) -> list[str]:
    return sorted(o for o in redact(overrides) if not o.startswith("sweep_name="))


def next_attempt(run_dir: Path, overrides: list[str] | None = None) -> tuple[str, dict | None]:
    """What to do with a run directory an earlier attempt may have used: ("skip", summary) when it completed (with
    the same overrides, when they are given), ("resume", None) when it has a checkpoint, else ("fresh", None) after
    removing what a failed attempt left."""
    done = finished(run_dir)
    if done is not None and (overrides is None or _comparable(done["status"]["overrides"]) == _comparable(overrides)):
        return "skip", done["summary"]
    if (run_dir / "checkpoints" / "latest").is_file():
        return "resume", None
    for name in STALE:
        (run_dir / name).unlink(missing_ok=True)
    return "fresh", None


def discard_if_empty(path: Path | None) -> None:
    """Remove a directory Hydra made before the job started (and its empty parent), if nothing was written to it."""
    for _ in range(2):
        if path is None or not path.is_dir() or any(path.iterdir()) or path.resolve() == Path.cwd().resolve():
            return
        path.rmdir()
        path = path.parent
        if path.name == "outputs":
            return
