"""Offline preference losses (DPO and its family), registered by name (`step.loss`): pure functions of the
log-probabilities of each pair's chosen and rejected answers.

Inputs per pair: `chosen` / `rejected` the policy's summed log-probs of the answer tokens, `chosen_len` /
`rejected_len` their token counts, `ref_chosen` / `ref_rejected` the frozen reference's (None for reference-free
losses), and the settings (`beta`, `label_smoothing`, `gamma`). Each returns (loss per pair, implicit reward of the
chosen answer, of the rejected one); the caller averages.

    sigmoid  DPO (Rafailov et al. 2023): -log sigmoid(beta * h), h = (pi_c - pi_r) - (ref_c - ref_r); with
             label_smoothing eps, conservative DPO: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    ipo      IPO (Azar et al. 2023): (h - 1 / (2 beta))^2, on length-averaged log-probs (as TRL does)
    hinge    SLiC-style hinge: max(0, 1 - beta * h)
    simpo    SimPO (Meng et al. 2024), reference-free: -log sigmoid(beta * (pi_c / |y_c| - pi_r / |y_r|) - gamma)
    orpo     ORPO (Hong et al. 2024), reference-free: NLL(y_c) / |y_c| - beta * log sigmoid(log odds(y_c) -
             log odds(y_r)), odds(y) = p / (1 - p) with p = exp(pi / |y|)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass(frozen=True)
class PreferenceLoss:
    name: str
    fn: Callable
    needs_reference: bool
    doc: str


LOSSES: dict[str, PreferenceLoss] = {}


def register(name: str, *, needs_reference: bool = True):
    def wrap(fn):
        LOSSES[name] = PreferenceLoss(name, fn, needs_reference, (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return wrap


def get(name: str) -> PreferenceLoss:
    if name not in LOSSES:
        raise KeyError(f"unknown preference loss {name!r} (known: {', '.join(sorted(LOSSES))})")
    return LOSSES[name]


@register("sigmoid")
def sigmoid(
    chosen,
    rejected,
    chosen_len,
    rejected_len,
    ref_chosen,
    ref_rejected,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    **_,
):
    """DPO's logistic loss on the log-ratio margin (label_smoothing > 0: conservative DPO)."""
    import torch.nn.functional as F

    h = (chosen - rejected) - (ref_chosen - ref_rejected)
    loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return loss, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()


@register("ipo")
def ipo(chosen, rejected, chosen_len, rejected_len, ref_chosen, ref_rejected, *, beta: float, **_):
    """IPO's squared loss towards a margin of 1 / (2 beta), on length-averaged log-probs."""
    h = (chosen / chosen_len - rejected / rejected_len) - (ref_chosen / chosen_len - ref_rejected / rejected_len)
    loss = (h - 1 / (2 * beta)) ** 2
    return loss, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()


@register("hinge")
def hinge(chosen, rejected, chosen_len, rejected_len, ref_chosen, ref_rejected, *, beta: float, **_):
    """The hinge loss max(0, 1 - beta * margin) (SLiC)."""
    import torch

    h = (chosen - rejected) - (ref_chosen - ref_rejected)
    return torch.relu(1 - beta * h), beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()


@register("simpo", needs_reference=False)
def simpo(
    chosen,
    rejected,
    chosen_len,
    rejected_len,
    ref_chosen=None,
    ref_rejected=None,
    *,
    beta: float,
    gamma: float = 0.5,
    **_,
):
    """SimPO: reference-free, length-normalised, with a target margin gamma."""
    import torch.nn.functional as F

    r_c, r_r = beta * chosen / chosen_len, beta * rejected / rejected_len
    return -F.logsigmoid(r_c - r_r - gamma), r_c.detach(), r_r.detach()


@register("orpo", needs_reference=False)
def orpo(chosen, rejected, chosen_len, rejected_len, ref_chosen=None, ref_rejected=None, *, beta: float, **_):
    """ORPO: the chosen answer's NLL plus beta times the odds-ratio loss, reference-free."""
    import torch
    import torch.nn.functional as F

    avg_c, avg_r = chosen / chosen_len, rejected / rejected_len
    log_odds = (avg_c - torch.log1p(-torch.exp(avg_c).clamp(max=1 - 1e-7))) - (
        avg_r - torch.log1p(-torch.exp(avg_r).clamp(max=1 - 1e-7))
    )
    loss = -avg_c - beta * F.logsigmoid(log_odds)
    return loss, beta * avg_c.detach(), beta * avg_r.detach()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's labelled tokens, their count): (B, T, V) logits, (B, T) labels with `ignore`
    where nothing is scored; position t predicts token t+1."""
    import torch

    targets = labels[:, 1:]
    mask = targets != ignore
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)
