"""Fault injection for the tests of what survives a crash: RUNNER_FAULT=<where>:<step>[:<rank>] makes that rank
die (SIGKILL, as the OOM killer or a preempted node would) at that point. Unset, it does nothing."""

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
