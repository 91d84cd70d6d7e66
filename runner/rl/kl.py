"""The KL penalty: per-token rewards with the penalty (PPO style), the penalty coefficient's controllers, and the
running statistics that normalise reward-model scores."""

from __future__ import annotations

import math

import torch

from runner.rl.ops import last_index


def token_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    clip_reward_value: float,
) -> torch.Tensor:
    """-kl_coef * (log pi - log pi_ref) on every answer token, plus the clipped score on the last one."""
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    last = last_index(mask)
    clipped = scores.clamp(-clip_reward_value, clip_reward_value)
    rewards[torch.arange(len(scores)), last] += clipped.to(rewards.dtype)
    return rewards


KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimates of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL divergence"), with
    r = log pi_ref - log pi:  k1 = -r (unbiased, can be negative), k2 = r^2 / 2, k3 = exp(r) - 1 - r (unbiased, never
    negative: GRPO's)."""
    r = ref_logprobs - logprobs
    if kind == "k1":
        return -r
    if kind == "k2":
        return 0.5 * r**2
    if kind == "k3":
        return torch.exp(r) - 1 - r
    raise ValueError(f"unknown KL estimator {kind!r} (known: {', '.join(KL_ESTIMATORS)})")


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment per answer: 0 up to max_len - buffer tokens, then falling linearly to -factor
    at max_len (and -factor beyond)."""
    start = max_len - buffer
    over = (lengths.to(torch.float32) - start).clamp(min=0) / max(buffer, 1)
    return -factor * over.clamp(max=1.0)


def informative_groups(scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(B,) bool: answers whose group's scores are not all equal (DAPO's dynamic sampling keeps only these; a group
    whose answers all score the same gives every answer advantage 0)."""
    _, index = torch.unique(groups, return_inverse=True)
    n = int(index.max()) + 1 if len(index) else 0
    high = torch.full((n,), float("-inf"), dtype=scores.dtype, device=scores.device).scatter_reduce(
        0, index, scores, reduce="amax"
    )
    low = torch.full((n,), float("inf"), dtype=scores.dtype, device=scores.device).scatter_reduce(
        0, index, scores, reduce="amin"
    )
    return (high > low)[index]


class KLController:
    """The KL penalty coefficient: fixed, or adaptive (Ziegler et al. 2019): after each step the coefficient is
    multiplied by 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon, for n answers with mean KL `KL`."""

    KINDS = ("fixed", "adaptive")

    def __init__(self, kind: str, coef: float, target: float, horizon: int):
        if kind not in self.KINDS:
            raise ValueError(f"unknown KL controller {kind!r}")
        self.kind, self.value, self.target, self.horizon = kind, float(coef), float(target), int(horizon)

    def update(self, kl: float, n: int) -> None:
        if self.kind == "adaptive":
            error = max(-0.2, min(0.2, kl / self.target - 1.0))
            self.value *= 1.0 + error * n / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class RunningMoments:
    """Mean and standard deviation of every score seen so far (merged across ranks by the caller's sums)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, count: int, total: float, total_sq: float) -> None:
        if count == 0:
            return
        batch_mean = total / count
        batch_m2 = max(total_sq - count * batch_mean**2, 0.0)
        delta = batch_mean - self.mean
        new_count = self.count + count
        self.mean += delta * count / new_count
        self.m2 += batch_m2 + delta**2 * self.count * count / new_count
        self.count = new_count

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]
