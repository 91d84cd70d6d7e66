"""Losses, each a small pure function: PPO's clipped policy and value losses and the pairwise (Bradley-Terry)
reward-model loss. Per-token losses are masked means over the answer tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runner.rl.ops import masked_mean


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (a masked mean over answer tokens) and the fraction of tokens where clipping bit."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_fraction


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
    coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """coef * max((v - R)^2, (clip(v, v_old +- c) - R)^2), masked mean; and the fraction of clipped values."""
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped - returns) ** 2
    loss = coef * masked_mean(torch.max(unclipped_err, clipped_err), mask)
    return loss, masked_mean((clipped_err > unclipped_err).float(), mask)


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Per pair: -log sigmoid(r_chosen - r_rejected - margin) (the reward model's Bradley-Terry loss)."""
    return -F.logsigmoid(chosen - rejected - margin)
