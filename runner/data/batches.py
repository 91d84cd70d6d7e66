"""Batches on the ranks: which samples each rank takes at each step (the same samples per step whatever the world
size), where a run is in its data (a `Cursor`, saved in checkpoints), and padding to the longest sample."""

from __future__ import annotations

import torch

IGNORE = -100


def train_batches(n: int, micro: int, world: int, rank: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's micro-batches for one epoch. Global micro-step b takes the samples
    perm[b·micro·world : (b+1)·micro·world] and rank r takes its r-th slice, so the samples of a step do not depend on
    how they are spread over ranks."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    per_step = micro * world
    return [perm[b * per_step + rank * micro : b * per_step + (rank + 1) * micro] for b in range(n // per_step)]


def eval_batches(n: int, micro: int, world: int, rank: int) -> list[list[int]]:
    mine = list(range(rank, n, world))
    return [mine[i : i + micro] for i in range(0, len(mine), micro)]


class Cursor:
    """This rank's position in its training data: epoch and batch within it. Batches of `size` samples per rank;
    an epoch ends after the last whole group of `group` batches (an incomplete optimizer step is dropped)."""

    def __init__(self, n: int, size: int, world: int, rank: int, seed: int, group: int = 1):
        self.n, self.size, self.world, self.rank, self.seed, self.group = n, size, world, rank, seed, group
        self.epoch, self.position = 0, 0
        self._batches = None

    def next(self) -> list[int]:
        if self._batches is None:
            self._batches = train_batches(self.n, self.size, self.world, self.rank, self.seed, self.epoch)
        if self.position >= len(self._batches) // self.group * self.group:
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = train_batches(self.n, self.size, self.world, self.rank, self.seed, self.epoch)
        self.position += 1
        return self._batches[self.position - 1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._batches = state["epoch"], state["position"], None


def pad(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, attention mask), padded to the longest on the right (training) or left (generation)."""
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        where = slice(0, len(s)) if side == "right" else slice(longest - len(s), longest)
        ids[i, where] = torch.tensor(s, dtype=torch.long)
        mask[i, where] = 1
    return ids, mask


class CausalLMCollator:
    """Pads a batch to its longest sample; labels mask padding and (unless train_on_prompt) the prompt."""

    def __init__(self, pad_id: int, train_on_prompt: bool = False):
        self.pad_id, self.train_on_prompt = pad_id, train_on_prompt

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = pad([r["input_ids"] for r in rows], self.pad_id)
        labels = torch.full_like(ids, IGNORE)
        for i, r in enumerate(rows):
            start = 0 if self.train_on_prompt else r["prompt_len"]
            labels[i, start : len(r["input_ids"])] = ids[i, start : len(r["input_ids"])]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class PairCollator:
    """A batch of B pairs -> 2B sequences (the B chosen first, then the B rejected), padded to the longest; with
    `labels`, each sequence's answer tokens as labels (prompt and padding IGNORE), for methods scoring answers."""

    def __init__(self, pad_id: int, labels: bool = False):
        self.pad_id, self.labels = pad_id, labels

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        ids, mask = pad(seqs, self.pad_id)
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.labels:
            labels = torch.full_like(ids, IGNORE)
            starts = [r["prompt_len"] for r in rows] * 2
            for i, (s, start) in enumerate(zip(seqs, starts)):
                labels[i, start : len(s)] = ids[i, start : len(s)]
            batch["labels"] = labels
        return batch
