"""The record a run directory keeps of itself (status.json, with the overrides it ran with, secrets redacted), and
what a run that was started before does on its next attempt: skip (completed with the same overrides), resume
(it has a checkpoint) or start afresh (stale files of the failed attempt removed). Used for sweep points, SLURM
requeues and pipeline stages alike."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from runner.errors import ConfigError
from runner.overrides import redact

STALE = ("metrics.jsonl", "summary.json", "status.json", "launch.log", "samples.jsonl")  # what an attempt writes


def write_status(run_dir: Path, status: str, overrides: list[str], **extra) -> None:
    """status.json: what happened to this run (running / completed / stopped / preempted / failed / aborted /
    invalid / planned); the statuses of its earlier attempts are kept under `history`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "status.json"
    history = []
    try:
        old = json.loads(path.read_text())
        history = old.pop("history", [])
        if old.get("status") != "running" or old.get("pid") != os.getpid():  # not this attempt's own "running"
            history.append(old)
    except (OSError, ValueError):
        pass
    record = {"status": status, "overrides": redact(overrides), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
    if status == "running":
        record.update(pid=os.getpid(), host=socket.gethostname())
    tmp = path.with_name(".status.json.tmp")
    tmp.write_text(json.dumps({**record, "history": history} if history else record, indent=2) + "\n")
    os.replace(tmp, path)


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
    the same overrides, when they are given; other overrides mean another sweep of the same name: refused), ("resume",
    None) when it has a complete checkpoint, else ("fresh", None) after removing what a failed attempt left."""
    from runner import manifest

    done = finished(run_dir)
    if (
        done is not None
        and overrides is not None
        and _comparable(done["status"]["overrides"]) != _comparable(overrides)
    ):
        raise ConfigError(
            "run_dir",
            f"{run_dir} holds a completed run with other overrides "
            f"({' '.join(done['status']['overrides'])}), from another sweep of the same name",
            "give this sweep its own sweep_name=",
        )
    if done is not None:
        return "skip", done["summary"]
    if manifest.resume_point(run_dir)[0] is not None:
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


LOCK = ".lock"


def _alive(lock: Path) -> bool:
    """Whether the run that holds a lock is still running (a lock of another host is taken as alive)."""
    try:
        info = json.loads(lock.read_text())
    except (OSError, ValueError):
        return False
    if info.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(info["pid"]), 0)
    except (ProcessLookupError, ValueError, KeyError):
        return False
    except PermissionError:
        return True
    return True


def _take(run_dir: Path) -> bool:
    """Take the directory's lock (atomically), unless a live run holds it; a dead run's lock is taken over."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _alive(lock):
                return False
            lock.unlink(missing_ok=True)  # a run that died without releasing it
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        return True
    return False


def used(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in ("status.json", "config.yaml", "pipeline.yaml"))


def claim(run_dir: Path, explicit: bool, resume: bool) -> Path:
    """The directory this run writes into, locked for it. A run never writes into another run's directory: a
    default (timestamped) directory that another run started in the same second is replaced by a sibling with a
    suffix; an explicit run_dir= that holds another run is refused (unless this run resumes it)."""
    if _take(run_dir) and (resume or not used(run_dir)):
        return run_dir
    if (run_dir / LOCK).exists() and json.loads((run_dir / LOCK).read_text()).get("pid") == os.getpid():
        release(run_dir)
    if explicit or resume:
        holder = (
            "is in use by a running run"
            if (run_dir / LOCK).exists() and _alive(run_dir / LOCK)
            else "holds another run"
        )
        raise ConfigError(
            "run_dir",
            f"{run_dir} {holder}",
            f"choose a new run_dir, or resume={run_dir} to continue that run (when it has stopped)",
        )
    for n in range(2, 1000):
        sibling = run_dir.with_name(f"{run_dir.name}-{n}")
        if not used(sibling) and _take(sibling):
            return sibling
    raise ConfigError("run_dir", f"no free directory beside {run_dir}", "set run_dir=")


def release(run_dir: Path) -> None:
    (run_dir / LOCK).unlink(missing_ok=True)
