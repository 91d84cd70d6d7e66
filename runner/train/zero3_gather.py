"""One all-gather, not one per parameter, when ZeRO-3 re-gathers its persistent parameters on a CPU (gloo) run.

After every optimizer step, DeepSpeed's ZeRO-3 gathers the parameters it keeps whole between steps (those under
`stage3_param_persistence_threshold`: biases, norms, small matrices) through `Init._allgather_params_coalesced`,
which, despite its name, launches one collective per parameter. On GPUs those are cheap asynchronous NCCL calls;
with gloo on a CPU each one is a round trip between the ranks: the tiny model's 35 took 12-17x as long as one
all-gather of their concatenation (`python bench/bench_allgather.py`). This module makes that call one all-gather of
a flat buffer holding every parameter's partition, then gives each parameter a view of its gathered whole, as
DeepSpeed's own version does. Gathering is a copy, so the parameters are bitwise the same as DeepSpeed's (a test
compares them).

It applies only where it is known to be right: the CPU accelerator, the DeepSpeed versions whose method it was
written against, unquantized parameters of one dtype in one process group, no hierarchical (ZeRO++ hpZ) gather.
Anything else goes to DeepSpeed's own method, unchanged.
"""

from __future__ import annotations

import torch

VERSIONS = ("0.19.",)  # the DeepSpeed releases whose Init._allgather_params_coalesced this replaces (read, not guessed)


def install() -> bool:
    """Route ZeRO-3's persistent-parameter gather through `gather_flat` on this rank; True if it was installed."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.partition_parameters import Init

    if get_accelerator().device_name() != "cpu" or not deepspeed.__version__.startswith(VERSIONS):
        return False
    if getattr(Init._allgather_params_coalesced, "runner_flat", False):
        return True
    original = Init._allgather_params_coalesced

    def allgather_params_coalesced(self, param_list, hierarchy=0, quantize=False):
        target = None if quantize or hierarchy else flat_target(self, param_list)
        if target is None:
            return original(self, param_list, hierarchy, quantize)
        gather_flat(param_list, *target)
        return None

    allgather_params_coalesced.runner_flat = True
    Init._allgather_params_coalesced = allgather_params_coalesced
    return True


def flat_target(init, params: list) -> tuple[int, object] | None:
    """(world size, process group) when one flat gather serves `params`: at least two, all unquantized, of one dtype
    and partitioned over the same group of more than one rank; else None (DeepSpeed's own method)."""
    if len(params) < 2:
        return None
    first = params[0]
    group, world, dtype = init.get_partition_dp_group(first), init._partition_world_size(first), first.ds_tensor.dtype
    same = all(
        p.ds_tensor.dtype == dtype
        and init.get_partition_dp_group(p) is group
        and init._partition_world_size(p) == world
        and not hasattr(p.ds_tensor, "ds_quant_scale")
        for p in params
    )
    return (world, group) if world > 1 and same else None


def gather_flat(params: list, world: int, group) -> None:
    """Every parameter whole from its `world` partitions (param.ds_tensor, each rank's slice of the flattened
    parameter, zero-padded to equal size) with one all_gather_into_tensor: rank r's partitions, concatenated,
    land in row r of the result; each parameter becomes a view of its own gathered copy."""
    import deepspeed.comm as dist

    sizes = [p.ds_tensor.ds_numel for p in params]
    local = torch.cat([p.ds_tensor.data.reshape(-1)[:n] for p, n in zip(params, sizes)])
    rows = torch.empty(world, local.numel(), dtype=local.dtype, device=local.device)
    dist.all_gather_into_tensor(rows.view(-1), local, group=group)
    start = 0
    for p, n in zip(params, sizes):
        whole = rows[:, start : start + n].reshape(-1)  # a copy: rank 0's slice, then rank 1's, ...
        p.data = whole.narrow(0, 0, p.ds_numel).view(p.ds_shape)
        start += n
