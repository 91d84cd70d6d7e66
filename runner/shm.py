"""DeepSpeed's CPU all-reduce buffers in /dev/shm.

On CPU, DeepSpeed (ops/csrc/cpu/comm/shm.cpp) gives every rank a 66 MB shared-memory buffer named
deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> and never removes it: each run would leave its
ranks' buffers in RAM (/dev/shm is memory) until the machine reboots; a few hundred runs fill it. Each rank unlinks
its own buffer once every rank has mapped every buffer (the mappings live on until the ranks exit), and the driver
removes whatever a rank that died early left behind. No heavy imports: the driver calls this.
"""

from __future__ import annotations

import os
from pathlib import Path

SHM = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer"


def buffers(port, addr: str = "*", rank: str = "*") -> list[Path]:
    """This user's buffers of the process group on `port` (any address and rank unless given)."""
    return sorted(SHM.glob(f"{PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"))


def release(port, addr: str = "*", rank: str = "*") -> int:
    """Unlink the matching buffers (processes that mapped them keep them until they exit); returns how many."""
    removed = 0
    for path in buffers(port, addr, rank):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed
