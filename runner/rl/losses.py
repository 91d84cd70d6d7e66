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


AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str, norm: float = 1.0) -> torch.Tensor:
    """A (B, L) per-token loss as one number over the answer tokens:

    token-mean               every token weighs the same (DAPO; long answers weigh more)
    seq-mean-token-sum       each answer's token sum, averaged over answers
    seq-mean-token-mean      each answer's token mean, averaged over answers (GRPO's original)
    seq-mean-token-sum-norm  each answer's token sum / `norm` (a constant, e.g. the longest answer allowed),
                             averaged over answers (Dr. GRPO: no length normalisation)
    """
    if mode == "token-mean":
        return masked_mean(loss, mask)
    sums, lengths = (loss * mask).sum(1), mask.sum(1)
    if mode == "seq-mean-token-sum":
        return sums.mean()
    if mode == "seq-mean-token-mean":
        return (sums / lengths.clamp(min=1)).mean()
    if mode == "seq-mean-token-sum-norm":
        return (sums / norm).mean()
    raise ValueError(f"unknown loss aggregation {mode!r} (known: {', '.join(AGGREGATIONS)})")


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    norm: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate with an asymmetric range [1 - clip_low, 1 + clip_high] (DAPO's clip-higher) and, for
    negative advantages, dual clipping at dual_clip x |A| (Ye et al. 2020; None: off); aggregated by `agg`.
    Returns the loss and the fractions of tokens clipped (by the range; by the dual clip)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.max(unclipped, clipped)
    dual = torch.zeros_like(loss, dtype=torch.bool)
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual = (advantages < 0) & (loss > bound)
        loss = torch.where(advantages < 0, torch.min(loss, bound), loss)
    fractions = {
        "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
        "dual_clip_fraction": masked_mean(dual.float(), mask),
    }
    return aggregate(loss, mask, agg, norm), fractions


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
