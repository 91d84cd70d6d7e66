"""Distributed set-up and DeepSpeed engines: one call per engine, the same for every stage."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from runner import console, shm
from runner.train import zero3_gather


@dataclasses.dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    tensor: int = 1  # parallel.tensor: consecutive ranks sharing one model's layers (AutoTP)
    sequence: int = 1  # parallel.sequence: consecutive ranks sharing each sequence (Ulysses)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def data_world(self) -> int:
        """Data-parallel ranks (parallel.data): the groups that each train on their own batch."""
        return self.world // (self.tensor * self.sequence)

    @property
    def data_rank(self) -> int:
        """This rank's group: the ranks of one tensor/sequence-parallel group read the same samples."""
        return self.rank // (self.tensor * self.sequence)


def init_distributed(threads: int | None, parallel: DictConfig | None = None) -> Dist:
    """Join the process group the launcher set up (RANK, WORLD_SIZE, MASTER_ADDR, ... in the environment);
    `parallel`: the run's parallel.* degrees."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if threads:
        torch.set_num_threads(int(threads))
    for key, default in (
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
    ):
        os.environ.setdefault(key, default)  # a plain `python -m runner.worker DIR` runs as a single rank
    build_lock_note()
    deepspeed.init_distributed()
    if torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()  # every rank has mapped every rank's CPU all-reduce buffer
        zero3_gather.install()  # (CPU ranks) one all-gather for ZeRO-3's persistent parameters, not one per tensor
    shm.release(os.environ["MASTER_PORT"], os.environ["MASTER_ADDR"], os.environ["RANK"])  # (runner/shm.py)
    local_rank = int(os.environ["LOCAL_RANK"])
    accel = get_accelerator()
    if accel.device_name() == "cuda":
        accel.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    degrees = {k: int(parallel[k]) for k in ("tensor", "sequence")} if parallel is not None else {}
    return Dist(
        rank=int(os.environ["RANK"]),
        world=int(os.environ["WORLD_SIZE"]),
        local_rank=local_rank,
        device=device,
        **degrees,
    )


def build_lock_note() -> None:
    """On CPU, DeepSpeed compiles its communication op on first use, under a lock file that torch waits on for as
    long as it exists: a compile that was killed leaves it behind, and every later run would wait without a word."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    for lock in root.glob("*/deepspeed_shm_comm/lock"):
        age = time.time() - lock.stat().st_mtime
        console.line(
            f"note: waiting for DeepSpeed's CPU communication op to be compiled (lock {lock}, {age:.0f} s old). "
            f"If no other process is compiling it (an interrupted compile leaves the lock behind), remove {lock}.",
            err=True,
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def param_groups(model: torch.nn.Module, optimizer: DictConfig) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if any(nd in name for nd in optimizer.no_decay) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": float(optimizer.weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def initialize(model: torch.nn.Module, optimizer: DictConfig, ds_config: dict, mpu=None):
    """deepspeed.initialize with the optimizer from the JSON (impl=deepspeed) or a client torch optimizer of the same
    name (impl=torch: AdamW, Adagrad); the LR schedule always comes from the JSON's scheduler block. `mpu`: Ulysses'
    sequence-parallel groups (runner.train.parallel)."""
    import deepspeed

    groups = param_groups(model, optimizer)
    client = None
    if optimizer.impl == "torch":
        own = {"betas": tuple(optimizer.betas)} if optimizer.name == "AdamW" else {}
        client = getattr(torch.optim, optimizer.name)(
            groups, lr=float(optimizer.lr), eps=float(optimizer.eps), fused=bool(optimizer.fused), **own
        )
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=client, model_parameters=None if client else groups, config=ds_config, mpu=mpu
    )
    skip_lone_allreduce(engine)
    return engine


def skip_lone_allreduce(engine) -> bool:
    """A run of one rank at ZeRO stage 0 has nobody to all-reduce gradients with, yet DeepSpeed flattens every
    gradient, all-reduces the flat buffer with itself, divides it by 1 and copies it back after each backward (~6% of
    a tiny model's training loop). Turned off there (the gradients are bitwise the same); True when it was."""
    import deepspeed.comm as dist

    if engine.zero_optimization_stage() != 0 or dist.get_world_size() != 1:
        return False
    engine.enable_backward_allreduce = False
    return True


def initialize_frozen(model: torch.nn.Module, ds_config: dict):
    """An inference engine for a frozen model (PPO's reference and reward model): no optimizer, eval mode, no
    gradients; ZeRO-3 (and parameter offload) as its JSON says."""
    import deepspeed

    for p in model.parameters():
        p.requires_grad = False
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine


def grad_norm(engine) -> float | None:
    """The global gradient norm before clipping, where DeepSpeed does not record it itself: a plain optimizer at
    ZeRO stage 0, whose module holds every (already all-reduced, unscaled) gradient at the accumulation boundary.
    DeepSpeed's own wrappers (ZeRO, fp16/bf16 optimizers) record it: None, and the caller reads
    engine.get_global_grad_norm() after the step (fp16 gradients in .grad are loss-scaled); under AutoTP at stage 0
    DeepSpeed records none either (the log shows no grad_norm)."""
    if engine.zero_optimization_stage() != 0 or hasattr(engine.optimizer, "_global_grad_norm"):
        return None
    if engine.autotp_size() > 1:  # the module holds this rank's shards: their norm is not the model's
        return None
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    import deepspeed.comm as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def memory_mb(device: torch.device) -> float:
    """Memory held now: allocated on the GPU, or this process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def gather_objects(obj, world: int) -> list:
    import deepspeed.comm as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def ds_config(run_dir: Path, name: str = "") -> dict:
    """The DeepSpeed JSON the driver wrote for one engine: ds_config.json (the trained model's) or
    ds_config.<name>.json."""
    return json.loads((run_dir / (f"ds_config.{name}.json" if name else "ds_config.json")).read_text())


def now(device: torch.device) -> float:
    """Wall-clock time once the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def local_partition_numel(engine, dist: Dist) -> list[int] | None:
    """Under ZeRO-3, the parameter elements each rank holds: evidence that parameters really are sharded."""
    if not engine.zero_optimization_partition_weights():
        return None
    local = sum(p.ds_tensor.numel() for p in engine.module.parameters() if hasattr(p, "ds_tensor"))
    return gather_objects(int(local), dist.world)
