"""Advantage estimators, registered by name (`step.advantage`): pure functions of per-token rewards.

Every estimator has the signature `fn(rewards, mask, *, values=None, groups=None, **settings) -> (advantages,
returns)`, all (B, L) and zero outside the answer mask. `rewards` are per-token rewards (the score on the last answer
token, plus any per-token KL penalty); `values` the critic's values (only estimators registered with
needs_values=True get them, and only they need a critic); `groups` (B,) the prompt each answer belongs to.
The registry imports no torch (the driver checks names with it); each function imports it when it runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass(frozen=True)
class Estimator:
    name: str
    fn: Callable
    needs_values: bool  # True: a critic engine provides values
    doc: str


REGISTRY: dict[str, Estimator] = {}


def register(name: str, *, needs_values: bool = False):
    def wrap(fn):
        REGISTRY[name] = Estimator(name, fn, needs_values, (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return wrap


def get(name: str) -> Estimator:
    if name not in REGISTRY:
        raise KeyError(f"unknown advantage estimator {name!r} (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's answer tokens; the value after the last token is 0.
    Returns (advantages, returns = advantages + values), zero outside the mask."""
    import torch

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


@register("gae", needs_values=True)
def gae_estimator(rewards, mask, *, values=None, groups=None, gamma: float = 1.0, lam: float = 0.95, **_):
    """GAE with a critic's values (PPO)."""
    return gae(rewards, values, mask, gamma, lam)
