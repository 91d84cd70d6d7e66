"""Run the runner of another git revision beside this checkout's: a detached worktree of REV under a temporary
directory, used by the benchmark scripts that compare revisions in one run (interleaved).

    from bench._revisions import checkout
    with checkout("HEAD~3") as old_root: ...      # a path whose `python -m runner` is that revision's
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def checkout(rev: str):
    """A worktree of `rev` (any git revision: a commit, a tag, HEAD~N); removed afterwards. `current` (or '.')
    yields this checkout itself."""
    if rev in ("current", "."):
        yield REPO
        return
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=REPO, capture_output=True, text=True
    )
    if commit.returncode:
        raise SystemExit(f"error: {rev!r} is not a git revision of {REPO}")
    tmp = Path(tempfile.mkdtemp(prefix="runner-rev-"))
    path = tmp / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(path), commit.stdout.strip()], cwd=REPO, check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
