"""SLURM jobs submitted by Hydra's submitit launcher (deployment=slurm): one task per node. Task 0 plans, writes the
run directory and launches the torchrun agent of the first node; the other tasks wait for its word on this attempt
(a marker file in the job's directory) and run the launch.sh it wrote, or nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def attempt() -> str | None:
    """This SLURM job attempt (job id and requeue count), when running inside an allocation."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    return f"{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"


def is_task_zero() -> bool:
    return os.environ.get("SLURM_PROCID", "0") == "0"


def marker(job_dir: Path, attempt_id: str) -> Path:
    return job_dir / f".slurm-attempt-{attempt_id}"


def announce(job_dir: Path, attempt_id: str, word: str) -> None:
    """Task 0's word to the other tasks: `launch RUN_DIR` or why nothing was launched."""
    marker(job_dir, attempt_id).write_text(word + "\n")


def announced(job_dir: Path, attempt_id: str) -> bool:
    return marker(job_dir, attempt_id).exists()


def follow_task_zero(job_dir: Path, attempt_id: str) -> None:
    """Tasks 1..N-1: wait for task 0's word (it always leaves one), then run the launch.sh it wrote, or nothing."""
    path = marker(job_dir, attempt_id)
    for _ in range(3600):
        if path.exists():
            break
        time.sleep(1)
    else:
        print(f"error: task 0 left no {path} in an hour", file=sys.stderr)
        sys.exit(1)
    word = path.read_text().strip()
    if not word.startswith("launch "):
        print(f"task 0 did not launch ({word}); nothing to do on this node")
        return
    rc = subprocess.call(["bash", str(Path(word.split(" ", 1)[1]) / "launch.sh")])
    if rc != 0:
        sys.exit(rc)
