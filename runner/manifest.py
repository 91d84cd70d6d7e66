"""Which checkpoints of a run are complete, shared by the driver (which one a resume starts from, decided before
launch) and the ranks (which write the record when a save is done).

A save is committed last, by rank 0, after every rank has written its files: `checkpoints/<tag>/complete.json`
lists every file of the tag (of every engine: checkpoints/<tag>/ and checkpoints/<engine>/<tag>/) with its size,
then `checkpoints/latest` names the tag. Each is written to a temporary file, flushed to disk and renamed, so a crash
at any moment leaves either the previous checkpoint or the new one, never a half of one that looks whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MANIFEST = "complete.json"


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new one, whole (write, fsync, rename, fsync dir)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(ckpt_dir: Path, tag: str, step: int, others: list[str], latest: bool = True) -> None:
    """Rank 0, after every rank wrote its files: flush them, record them, and (for resumable tags) point `latest`
    at the tag — in every other engine's folder (checkpoints/<engine>/), then the main one, the commit point."""
    dirs = [ckpt_dir / tag] + [ckpt_dir / name / tag for name in others]
    files = {
        str(f.relative_to(ckpt_dir)): f.stat().st_size
        for d in dirs
        for f in sorted(d.rglob("*"))
        if f.is_file() and f.name != MANIFEST
    }
    for name in files:
        with open(ckpt_dir / name, "rb") as fh:
            os.fsync(fh.fileno())
    write_atomic(ckpt_dir / tag / MANIFEST, json.dumps({"tag": tag, "step": step, "files": files}, indent=1))
    if latest:
        for name in others:
            write_atomic(ckpt_dir / name / "latest", tag)
        write_atomic(ckpt_dir / "latest", tag)


def is_complete(ckpt_dir: Path, tag: str) -> bool:
    path = ckpt_dir / tag / MANIFEST
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    for name, size in record.get("files", {}).items():
        f = ckpt_dir / name
        if not f.is_file() or f.stat().st_size != size:
            return False
    return bool(record.get("files"))


def step_tags(ckpt_dir: Path) -> list[str]:
    """stepN tags, newest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step") and p.name[4:].isdigit()]
    return sorted(tags, key=lambda t: -int(t[4:]))


def resume_point(run_dir: Path) -> tuple[str | None, list[str]]:
    """The tag a resume starts from: the one `latest` names if it is complete, else the newest complete stepN; and
    plain statements about incomplete checkpoints passed over."""
    ckpt_dir = run_dir / "checkpoints"
    notes = []
    try:
        named = (ckpt_dir / "latest").read_text().strip() or None
    except OSError:
        named = None
    if named and is_complete(ckpt_dir, named):
        return named, notes
    for tag in step_tags(ckpt_dir):
        if is_complete(ckpt_dir, tag):
            why = f"`latest` names {named}, which is incomplete" if named else "`latest` is missing or empty"
            notes.append(
                f"{why} (the run stopped while saving it?): resuming from {tag}, the newest complete checkpoint"
            )
            return tag, notes
        notes.append(f"checkpoint {tag} is incomplete and is skipped")
    return None, notes


def step_of(run_dir: Path, tag: str) -> int:
    return int(json.loads((run_dir / "checkpoints" / tag / MANIFEST).read_text())["step"])
