"""Fault injection for the tests of what survives a crash or a preemption, at a chosen step:

    RUNNER_FAULT=save:<step>[:<rank>]    the rank dies (SIGKILL, as the OOM killer or a lost node would) after
                                         writing its checkpoint files, before the checkpoint is committed
    RUNNER_FAULT=term-driver:<step>      rank 0 sends SIGTERM to the driver (as a scheduler preempting the job would)
                                         when that step ends

Unset, it does nothing."""

from __future__ import annotations

import os
import signal


def maybe_fail(where: str, step: int, rank: int) -> None:
    spec = os.environ.get("RUNNER_FAULT")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] == where and int(parts[1]) == step and (len(parts) < 3 or int(parts[2]) == rank):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_signal_driver(step: int, rank: int) -> None:
    spec = os.environ.get("RUNNER_FAULT", "")
    if spec.startswith("term-driver:") and int(spec.split(":")[1]) == step and rank == 0:
        os.kill(int(os.environ["RUNNER_DRIVER_PID"]), signal.SIGTERM)
