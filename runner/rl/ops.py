"""Tensor operations the RL arithmetic shares. Shapes: B sequences, T tokens; L = T - 1 (position t scores the
token at t+1). A (B, L) 0/1 `mask` marks the answer's tokens (the actions)."""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return (x * mask).sum(dim)


def _next_token_logp(logits: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits -> (B, T-1, V) float log-probabilities of the token after each position but the last."""
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def _picked(logp: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


def logprobs_of(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t+1 | tokens <= t) for t = 0..T-2: (B, T, V) logits, (B, T) ids -> (B, T-1)."""
    return _picked(_next_token_logp(logits), input_ids)


def logprobs_and_entropy(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logprobs_of and entropy_of from one log-softmax (the (B, T, V) float copy is made once, not twice)."""
    logp = _next_token_logp(logits)
    return _picked(logp, input_ids), _entropy(logp)


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each next-token distribution: (B, T, V) -> (B, T-1)."""
    return _entropy(_next_token_logp(logits))


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a (B, L) 0/1 mask (0 for an empty row)."""
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    return (positions * mask.long()).max(dim=1).values


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the masked entries; zero outside the mask."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask
