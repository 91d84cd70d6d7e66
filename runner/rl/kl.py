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
