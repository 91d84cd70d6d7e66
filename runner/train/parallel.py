"""Tensor and sequence parallelism on the ranks (parallel.tensor, parallel.sequence; the driver checked them).

Ranks are grouped as DeepSpeed groups them: each run of `tensor x sequence` consecutive ranks is one model-parallel
group that trains on one batch (runner.train.engine.Dist.data_rank picks it).

- Tensor (AutoTP): the JSON's `tensor_parallel.autotp_size` makes deepspeed.initialize shard every linear layer over
  the group; nothing else changes on the ranks, except that an evaluation's sums come once per group.
- Sequence (Ulysses): the model's attention is DeepSpeed's UlyssesSPAttentionHF around sdpa (an all-to-all from
  sequence shards to head shards and back); each rank feeds its slice of every sequence with the positions of the
  whole sequence, and the loss is the token mean over the whole group (an autograd all-reduce).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runner.data.batches import IGNORE
from runner.train.engine import Dist

_MPU = None  # Ulysses' groups (DeepSpeed's parallel_state_sp), once registered


def prepare(model: torch.nn.Module, dist: Dist, micro: int):
    """Before deepspeed.initialize: the groups to hand it as `mpu`, or None. AutoTP: DeepSpeed's tensor/data mesh,
    built now so that its JSON parse counts only the data-parallel ranks in train_batch_size (without it, the first
    parse counts every rank and zero.Init's re-parse only the data-parallel ones, and no value passes both).
    Ulysses: its attention registered for this model, and its groups."""
    global _MPU
    if dist.tensor > 1:
        from deepspeed.utils import groups

        groups._init_tp_mesh_device(tensor_model_parallel_size=dist.tensor)
        return groups
    if dist.sequence == 1:
        return None
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    config = model.config.get_text_config()
    if getattr(config, "num_key_value_heads", None) is None:  # OPT's config has no such key: every head is its own
        config.num_key_value_heads = config.num_attention_heads
    if model.config._attn_implementation != "sdpa":
        model.set_attn_implementation("sdpa")  # eager needs a 4-D mask Ulysses cannot shard
    _MPU = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model,
        core_attn_implementation="sdpa",
        sequence_parallel_size=dist.sequence,
        micro_batch_size=micro,
        seq_length_is_variable=True,
    )
    return _MPU


def shard(batch: dict) -> dict:
    """This rank's slice of each sequence of a right-padded causal-LM batch: input_ids, the positions of the whole
    sequence and the next-token labels (shifted before slicing, so the token at a slice's edge keeps its target).
    The batch is padded to a multiple of the group size (padding is after every real token: causal attention never
    reads it, and its labels are ignored)."""
    n, rank = _MPU.get_sequence_parallel_world_size(), _MPU.get_sequence_parallel_rank()
    ids, labels = batch["input_ids"], batch["labels"]
    length = ids.size(1) + (-ids.size(1)) % n
    ids = F.pad(ids, (0, length - ids.size(1)), value=0)
    targets = F.pad(labels[:, 1:], (0, length - labels.size(1) + 1), value=IGNORE)
    positions = torch.arange(length, device=ids.device).expand_as(ids)
    part = slice(rank * length // n, (rank + 1) * length // n)
    return {"input_ids": ids[:, part], "position_ids": positions[:, part], "targets": targets[:, part]}


def token_loss(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token losses, number of target tokens) of this rank's slice."""
    part = shard(batch)
    logits = engine(input_ids=part["input_ids"], position_ids=part["position_ids"]).logits.float()
    targets = part["targets"]
    summed = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return summed, (targets != IGNORE).sum()


def causal_lm_loss(engine, batch: dict) -> torch.Tensor:
    """The micro-batch's token-mean loss over the whole sequence group (what the model's own loss is on one rank).

    Its gradient is this slice's share only, sum(slice) / count(group): DeepSpeed sums the slices' gradients over the
    group (it divides the all-reduce by world / sequence), so an autograd all-reduce here would count each twice."""
    import torch.distributed as torch_dist

    group = _MPU.get_sequence_parallel_group()
    summed, count = token_loss(engine, batch)
    sums = torch.stack([summed.detach(), count.to(summed.dtype)])
    torch_dist.all_reduce(sums, group=group)
    total, count = sums[0], sums[1].clamp(min=1)
    return summed / count + (total - summed.detach()) / count  # value: the group's mean; gradient: this slice's
