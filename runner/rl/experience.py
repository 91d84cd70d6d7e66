"""Experience: what one rollout of an on-policy method produced, as a typed batch of tensors, and its plumbing.

Shapes: B answers; T = the batch's longest prompt + answer; L = T - 1. Sequences are right-padded, so a prompt of
p tokens followed by an answer of a tokens has its answer tokens scored at positions p-1 .. p+a-2 of the (B, L)
log-prob rows (position t scores token t+1): `action_mask` marks them.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


def action_mask(prompt_lens: list[int], answer_lens: list[int], width: int) -> torch.Tensor:
    """(B, width - 1) 0/1 mask of the answer tokens of right-padded prompt+answer rows."""
    mask = torch.zeros(len(prompt_lens), width - 1)
    for i, (p, a) in enumerate(zip(prompt_lens, answer_lens)):
        mask[i, p - 1 : p - 1 + a] = 1.0
    return mask


@dataclasses.dataclass
class Experience:
    input_ids: torch.Tensor  # (B, T) prompt + answer, right-padded
    attention_mask: torch.Tensor  # (B, T)
    action_mask: torch.Tensor  # (B, L) the answer tokens
    logprobs: torch.Tensor  # (B, L) the policy's log-probs when the answers were sampled
    scores: torch.Tensor  # (B,) the judge's score of each answer
    entropy: torch.Tensor  # (1,) mean entropy of the policy over the answer tokens
    ref_logprobs: torch.Tensor | None = None  # (B, L) the frozen reference's log-probs (None: no reference)
    values: torch.Tensor | None = None  # (B, L) the critic's values (None: no critic)
    term_scores: torch.Tensor | None = None  # (B, K) each term of the judge's score (None: one term)
    groups: torch.Tensor | None = None  # (B,) the prompt each answer answers (critic-free methods: n per prompt)
    rollout_logprobs: torch.Tensor | None = None  # (B, L) the log-probs vLLM sampled with (None: the policy sampled)

    PAD_FIELDS = {"input_ids"}  # padded with the pad token; every other (B, T/L) field with 0
    ROW_FIELDS = {"scores", "term_scores", "groups"}  # one entry (or vector) per answer: never padded

    @property
    def size(self) -> int:
        return self.input_ids.size(0)

    @classmethod
    def concat(cls, items: list[Experience], pad_id: int) -> Experience:
        """Experience batches of different widths -> one, right-padded to the widest."""
        if len(items) == 1:
            return items[0]
        width = max(e.input_ids.size(1) for e in items)
        out = {}
        for field in dataclasses.fields(cls):
            parts = [getattr(e, field.name) for e in items]
            if parts[0] is None:
                out[field.name] = None
                continue
            if field.name == "groups":  # each batch's prompts are its own: renumbered after the earlier batches'
                offsets = [0]
                for g in parts[:-1]:
                    offsets.append(offsets[-1] + int(g.max()) + 1 if len(g) else offsets[-1])
                parts = [g + o for g, o in zip(parts, offsets)]
            elif parts[0].dim() == 2 and field.name not in cls.ROW_FIELDS:
                fill = pad_id if field.name in cls.PAD_FIELDS else 0
                parts = [
                    F.pad(t, (0, (width if t.size(1) == e.input_ids.size(1) else width - 1) - t.size(1)), value=fill)
                    for t, e in zip(parts, items)
                ]
            out[field.name] = torch.cat(parts)
        return cls(**out)

    def chunk(self, idx: torch.Tensor) -> Experience:
        """The rows `idx`, trimmed to their own longest sequence (training chunks carry no padding columns)."""
        width = int(self.attention_mask[idx].sum(1).max())
        out = {}
        for field in dataclasses.fields(self):
            t = getattr(self, field.name)
            if t is None or t.dim() == 1 and field.name == "entropy":
                out[field.name] = t
            elif t.dim() == 1 or field.name in self.ROW_FIELDS:
                out[field.name] = t[idx]
            else:
                out[field.name] = t[idx, : width if t.size(1) == self.input_ids.size(1) else width - 1]
        return dataclasses.replace(self, **out)

    def select(self, keep: torch.Tensor) -> Experience:
        """The answers where `keep` (B,) is true, at the same width (dynamic sampling drops whole groups)."""
        idx = keep.nonzero().squeeze(1)
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name)[idx]
                for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None and f.name != "entropy"
            },
        )

    def to(self, device) -> Experience:
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None
            },
        )
