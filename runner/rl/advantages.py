"""Advantage estimators, registered by name (`step.advantage`): pure functions of per-token rewards.

Every estimator has the signature `fn(rewards, mask, *, values=None, groups=None, **settings) -> (advantages,
returns)`, all (B, L) and zero outside the answer mask. `rewards` are per-token rewards (the score on the last answer
token, plus any per-token KL penalty); `values` the critic's values (only estimators registered with
needs_values=True get them, and only they need a critic); `groups` (B,) the prompt each answer belongs to (the
critic-free estimators compare a prompt's answers with each other). An estimator registered with whiten=True leaves
the batch normalisation of its advantages to the caller, which computes the batch's mean and std over every rank.
The registry imports no torch (the driver checks names with it); each function imports it when it runs.

    gae           PPO: generalised advantage estimation with the critic's values
    grpo          GRPO (Shao et al. 2024): (R - mean of the group) / (std of the group + eps), on every answer token
    dr_grpo       Dr. GRPO (Liu et al. 2025): R - mean of the group (no std division; pair it with a length-free
                  loss aggregation, seq-mean-token-sum-norm)
    rloo          RLOO (Ahmadian et al. 2024): R - the mean of the group's other answers = n/(n-1) (R - mean)
    reinforce_pp  REINFORCE++ (Hu 2025): the return to go of the token rewards (KL per token in the reward), then
                  normalised over the whole batch (every rank)

R is an answer's return, the sum of its token rewards. A group of one answer has no baseline: GRPO and RLOO use R
itself (as verl does); a group whose answers score the same gets advantage 0 (no NaN).
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
    whiten: bool = False  # True: the caller normalises the advantages over the whole batch (all ranks)


REGISTRY: dict[str, Estimator] = {}


def register(name: str, *, needs_values: bool = False, whiten: bool = False):
    def wrap(fn):
        REGISTRY[name] = Estimator(name, fn, needs_values, (fn.__doc__ or "").strip().splitlines()[0], whiten)
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


def group_baseline(returns: torch.Tensor, groups: torch.Tensor, leave_one_out: bool = False, eps: float = 1e-6):
    """Per answer: the mean of its group's returns (or of the others', leave_one_out) and the group's std
    (unbiased; 1 for a group of one, whose baseline is 0)."""
    import torch

    _, index, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=returns.dtype, device=returns.device).index_add_(0, index, returns)
    n = counts.to(returns.dtype)[index]
    mean = sums[index] / n
    sq = torch.zeros_like(sums).index_add_(0, index, (returns - mean) ** 2)[index]
    std = torch.where(n > 1, (sq / (n - 1).clamp(min=1)).sqrt(), torch.ones_like(n))
    base = (sums[index] - returns) / (n - 1).clamp(min=1) if leave_one_out else mean
    return torch.where(n > 1, base, torch.zeros_like(base)), std


def _outcome(rewards: torch.Tensor, mask: torch.Tensor, per_answer: torch.Tensor):
    """A per-answer advantage on each of its answer tokens; the returns are the same (there is no critic)."""
    adv = per_answer.unsqueeze(1) * mask
    return adv, adv


@register("grpo")
def grpo(rewards, mask, *, values=None, groups=None, eps: float = 1e-6, **_):
    """GRPO: the answer's return minus its group's mean, divided by the group's std."""
    ret = (rewards * mask).sum(1)
    base, std = group_baseline(ret, groups)
    return _outcome(rewards, mask, (ret - base) / (std + eps))


@register("dr_grpo")
def dr_grpo(rewards, mask, *, values=None, groups=None, **_):
    """Dr. GRPO: the answer's return minus its group's mean (no std division)."""
    ret = (rewards * mask).sum(1)
    base, _ = group_baseline(ret, groups)
    return _outcome(rewards, mask, ret - base)


@register("rloo")
def rloo(rewards, mask, *, values=None, groups=None, **_):
    """RLOO: the answer's return minus the mean of its group's other answers."""
    ret = (rewards * mask).sum(1)
    base, _ = group_baseline(ret, groups, leave_one_out=True)
    return _outcome(rewards, mask, ret - base)


@register("reinforce_pp", whiten=True)
def reinforce_pp(rewards, mask, *, values=None, groups=None, gamma: float = 1.0, **_):
    """REINFORCE++: the discounted return to go of the token rewards (normalised over the batch by the caller)."""
    import torch

    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.size(0), dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] * mask[:, t] + gamma * running * mask[:, t]
        returns[:, t] = running
    return returns * mask, returns * mask
