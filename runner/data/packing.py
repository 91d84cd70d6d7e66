"""Packing (data.packing=true, SFT): several tokenised samples per row, up to data.max_seq_len tokens, with the
attention kept inside each sample.

The driver packs the training split once, into the data cache (`pack_dataset`: best-fit decreasing over a seeded
order, so every rank reads the same rows); a packed row is a training "sample" for the step arithmetic, the `Cursor`
and resume. `PackedCollator` pads a batch of packed rows to its longest and gives every token its position within
its own sample (`position_ids` restart at 0) and the sample it belongs to (`seq_ids`). `model_inputs` turns that
into what the model's attention implementation needs:

- sdpa / eager (CPU, and GPUs without flash-attn): a 4-D block-diagonal causal mask (batch, 1, L, L) passed as
  `attention_mask`; transformers uses a 4-D mask as given (masking_utils), and explicit `position_ids` override
  OPT's positions from the mask's cumsum, so OPT and Llama/Qwen are both correct.
- flash_attention_2/3: the batch flattened into one row without padding and `position_ids` only (transformers'
  `DataCollatorWithFlattening` format): flash-attn's varlen kernel finds the samples from the restarts.

The label of each sample's first token is IGNORE, as in an unpacked row (no loss across a boundary).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from runner.errors import ConfigError

if TYPE_CHECKING:
    import torch  # (imported where used: the driver checks data.packing without loading torch)

IGNORE = -100


WHY_NOT = {
    "sft": "its SFT rows beside answers it generates, in one forward pass",
    "pairs": "chosen/rejected pairs, scored side by side",
    "prompts": "prompts and generates its own answers",
}


def check(packing, method) -> None:
    """data.packing is a bool, and true only for a method whose samples are single sequences (Method.packs)."""
    if not isinstance(packing, bool):
        raise ConfigError("data.packing", f"must be true or false, got {packing!r}")
    if packing and not method.packs:
        raise ConfigError(
            "data.packing",
            f"does not apply to the {method.name} stage: packing puts several single sequences in one row, and "
            f"{method.name} reads {WHY_NOT.get(method.data, method.data + ' rows')}",
            "set data.packing=false (packing is for SFT)",
        )


def pack_lengths(lengths: list[int], capacity: int, seed: int) -> list[list[int]]:
    """Bins of sample indices whose lengths sum to at most `capacity`: best-fit decreasing (longest first, each into
    the fullest bin it fits), ties broken by a seeded permutation. Bins come out in order of creation, each with its
    samples in the order they were placed."""
    order = np.random.RandomState(seed).permutation(len(lengths))
    order = sorted(order.tolist(), key=lambda i: -lengths[i])  # stable: equal lengths keep the seeded order
    bins: list[list[int]] = []
    by_room: list[list[int]] = [[] for _ in range(capacity + 1)]  # room left -> bins with that much room
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than the row's {capacity}")
        room = next((r for r in range(n, capacity + 1) if by_room[r]), None)
        if room is None:  # no bin has room: a new one
            b, room = len(bins), capacity
            bins.append([])
        else:
            b = by_room[room].pop()
        bins[b].append(i)
        by_room[room - n].append(b)
    return bins


def pack_dataset(dataset, capacity: int, seed: int):
    """An SFT split (input_ids, prompt_len per sample) as packed rows: input_ids (the samples concatenated), lengths
    and prompt_lens (one per sample)."""
    from datasets import Dataset

    ids, prompt_lens = dataset["input_ids"], dataset["prompt_len"]
    bins = pack_lengths([len(x) for x in ids], capacity, seed)
    return Dataset.from_dict(
        {
            "input_ids": [[t for i in b for t in ids[i]] for b in bins],
            "lengths": [[len(ids[i]) for i in b] for b in bins],
            "prompt_lens": [[prompt_lens[i] for i in b] for b in bins],
        }
    )


class PackedCollator:
    """Packed rows -> input_ids, labels, attention_mask (2-D: real tokens; throughput counts it), position_ids
    (restarting at each sample) and seq_ids (the sample each token belongs to; the padding is one more)."""

    def __init__(self, pad_id: int, train_on_prompt: bool = False):
        self.pad_id, self.train_on_prompt = pad_id, train_on_prompt

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        import torch

        longest = max(len(r["input_ids"]) for r in rows)
        shape = (len(rows), longest)
        ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE, dtype=torch.long)
        mask = torch.zeros(shape, dtype=torch.long)
        positions = torch.zeros(shape, dtype=torch.long)
        seq_ids = torch.zeros(shape, dtype=torch.long)
        for b, row in enumerate(rows):
            start = 0
            for k, (n, p) in enumerate(zip(row["lengths"], row["prompt_lens"])):
                piece = torch.tensor(row["input_ids"][start : start + n], dtype=torch.long)
                ids[b, start : start + n] = piece
                first = max(0 if self.train_on_prompt else p, 1)  # a sample's first token is never a target
                labels[b, start + first : start + n] = piece[first:]
                positions[b, start : start + n] = torch.arange(n)
                seq_ids[b, start : start + n] = k
                start += n
            mask[b, :start] = 1
            positions[b, start:] = torch.arange(longest - start)  # the padding: one more causal block of its own
            seq_ids[b, start:] = len(row["lengths"])
        return {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": mask,
            "position_ids": positions,
            "seq_ids": seq_ids,
        }


def block_causal_mask(seq_ids: torch.Tensor) -> torch.Tensor:
    """(batch, 1, L, L) bool: token i sees token j when both are in the same sample and j <= i."""
    import torch

    n = seq_ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=seq_ids.device).tril()
    return ((seq_ids[:, :, None] == seq_ids[:, None, :]) & causal)[:, None]


def model_inputs(batch: dict, attn_implementation: str, dtype: torch.dtype) -> dict:
    """A packed batch as the model's keyword arguments for its attention implementation (see the module's doc)."""
    import torch

    if "seq_ids" not in batch:
        return batch
    out = {k: v for k, v in batch.items() if k != "seq_ids"}
    if attn_implementation.startswith(("flash_attention", "kernels-community/flash-attn")):
        keep = out.pop("attention_mask").bool()
        return {k: v[keep][None] for k, v in out.items()}  # one row, no padding: varlen from position_ids
    mask = block_causal_mask(batch["seq_ids"])
    if attn_implementation == "sdpa":
        out["attention_mask"] = mask
    elif attn_implementation == "eager":  # eager adds the mask to the scores
        out["attention_mask"] = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    else:
        raise ConfigError(
            "data.packing",
            f"the model's attention implementation {attn_implementation!r} has no packed path here",
            "use a model with sdpa, eager or flash_attention_2 attention, or set data.packing=false",
        )
    return out


def attention_of(model) -> tuple[str, torch.dtype]:
    """The attention implementation and dtype of a (possibly DeepSpeed- or peft-wrapped) transformers model."""
    inner = getattr(model, "module", model)
    return str(inner.config._attn_implementation), next(inner.parameters()).dtype
