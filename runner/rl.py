"""PPO's arithmetic, as pure functions of tensors: log-probabilities, per-token rewards with the KL penalty, GAE,
the clipped policy and value losses, KL controllers and running reward statistics. No engines, no I/O.

Shapes: B answers, L = sequence length - 1 (position t scores the token at t+1). `mask` (B, L) marks the answer's
tokens (the actions); everything outside it is ignored.
"""
from __future__ import annotations

import math

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def logprobs_of(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t+1 | tokens <= t) for t = 0..T-2: (B, T, V) logits, (B, T) ids -> (B, T-1)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each next-token distribution: (B, T, V) -> (B, T-1)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def token_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float, clip_reward_value: float) -> torch.Tensor:
    """-kl_coef * (log pi - log pi_ref) on every answer token, plus the clipped reward-model score on the last one."""
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    last = last_index(mask)
    clipped = scores.clamp(-clip_reward_value, clip_reward_value)
    rewards[torch.arange(len(scores)), last] += clipped.to(rewards.dtype)
    return rewards


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a (B, L) 0/1 mask (0 for an empty row)."""
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    return (positions * mask.long()).max(dim=1).values


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's answer tokens; the value after the last token is 0.
    Returns (advantages, returns = advantages + values), zero outside the mask."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.size(0), dtype=rewards.dtype, device=rewards.device)
    length = rewards.size(1)
    for t in reversed(range(length)):
        following = mask[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        next_value = values[:, t + 1] * following if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running * following
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (a masked mean over answer tokens) and the fraction of tokens where clipping bit."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_fraction


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float, coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """coef * max((v - R)^2, (clip(v, v_old +- c) - R)^2), masked mean; and the fraction of clipped values."""
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped - returns) ** 2
    loss = coef * masked_mean(torch.max(unclipped_err, clipped_err), mask)
    return loss, masked_mean((clipped_err > unclipped_err).float(), mask)


class KLController:
    """The KL penalty coefficient: fixed, or adaptive (Ziegler et al. 2019): after each step the coefficient is
    multiplied by 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon, for n answers with mean KL `KL`."""

    def __init__(self, kind: str, coef: float, target: float, horizon: int):
        if kind not in ("fixed", "adaptive"):
            raise ValueError(f"unknown KL controller {kind!r}")
        self.kind, self.value, self.target, self.horizon = kind, float(coef), float(target), int(horizon)

    def update(self, kl: float, n: int) -> None:
        if self.kind == "adaptive":
            error = max(-0.2, min(0.2, kl / self.target - 1.0))
            self.value *= 1.0 + error * n / self.horizon


class RunningMoments:
    """Mean and standard deviation of every score seen so far (merged across ranks by the caller's sums)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, count: int, total: float, total_sq: float) -> None:
        if count == 0:
            return
        batch_mean = total / count
        batch_m2 = max(total_sq - count * batch_mean ** 2, 0.0)
        delta = batch_mean - self.mean
        new_count = self.count + count
        self.mean += delta * count / new_count
        self.m2 += batch_m2 + delta ** 2 * self.count * count / new_count
        self.count = new_count

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0

    def state(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]
