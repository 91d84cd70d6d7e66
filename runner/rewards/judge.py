"""A judge scores answers on the ranks: the weighted sum of the `reward` group's terms, each a Python function
(`package.module:function`, called with a batch of prompts, answers and rows) or a reward-model export (its score at
the last token of prompt + answer). Every function's result is checked: one finite number per answer, or the run
stops with a message naming the function and the row."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
from omegaconf import DictConfig, OmegaConf


class RewardError(RuntimeError):
    """A reward function that raised, returned the wrong count or a number that is not finite."""


def load_function(path: str) -> Callable:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def term_name(term: DictConfig) -> str:
    return str(term.get("name") or (term.fn.rsplit(":", 1)[-1] if term.get("fn") else "reward_model"))


class Judge:
    """`reward.terms` as one scoring function. `models` maps a reward-model term's index to a frozen engine that
    returns per-token values (runner.train.models.ScalarHeadModel under DeepSpeed)."""

    def __init__(self, reward: DictConfig, tokenizer, models: dict[int, object] | None = None):
        self.tokenizer, self.terms = tokenizer, []
        self.pass_term = reward.get("pass_term")  # a term scoring 1 for a right answer: its share is the pass rate
        for i, term in enumerate(reward.terms):
            kwargs = OmegaConf.to_container(term.kwargs, resolve=True) if term.get("kwargs") else {}
            fn = load_function(str(term.fn)) if term.get("fn") else None
            name = term_name(term)
            name = f"{name}_{i}" if name in [t[0] for t in self.terms] else name
            self.terms.append((name, float(term.get("weight", 1.0)), fn, kwargs, (models or {}).get(i)))

    def __bool__(self) -> bool:
        return bool(self.terms)

    @property
    def names(self) -> list[str]:
        """The terms' names, in order (the columns of Experience.term_scores)."""
        return [t[0] for t in self.terms]

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor, prompt_lens: list[int], rows: list[dict]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scores (B,) of right-padded prompt + answer rows, and each term's own (B,) scores."""
        from runner.train.models import last_token_scores

        prompts = [
            self.tokenizer.decode(row[:p], skip_special_tokens=True) for row, p in zip(ids.tolist(), prompt_lens)
        ]
        answers = [
            self.tokenizer.decode(row[p:n], skip_special_tokens=True)
            for row, p, n in zip(ids.tolist(), prompt_lens, mask.sum(1).tolist())
        ]
        total, parts = torch.zeros(len(prompts), dtype=torch.float32, device=ids.device), {}
        for name, weight, fn, kwargs, model in self.terms:
            if fn is not None:
                values = check(name, call(name, fn, prompts, answers, rows, kwargs), len(answers), rows)
                scores = torch.tensor(values, dtype=torch.float32, device=ids.device)
            else:
                with torch.no_grad():
                    scores = last_token_scores(model(ids, mask), mask).float()
            parts[name] = scores
            total += weight * scores
        return total, parts


def call(name: str, fn: Callable, prompts, answers, rows, kwargs):
    try:
        return fn(prompts, answers, rows, **kwargs)
    except Exception as exc:
        first = rows[0].get("__row__") if rows and isinstance(rows[0], dict) else None
        batch = f" (a batch of {len(answers)} answers" + (f", the first for {first})" if first else ")")
        raise RewardError(f"reward function {name} raised {type(exc).__name__}: {exc}{batch}") from exc


def check(name: str, values, n: int, rows: list[dict]) -> list[float]:
    """One finite float per answer, or RewardError naming the function and the first bad row."""
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise RewardError(f"reward function {name} must return one number per answer: {exc}") from None
    if len(values) != n:
        raise RewardError(f"reward function {name} returned {len(values)} values for {n} answers")
    for i, v in enumerate(values):
        if not math.isfinite(v):
            where = rows[i].get("__row__", f"answer {i}") if rows and isinstance(rows[i], dict) else f"answer {i}"
            raise RewardError(f"reward function {name} returned {v} for {where}")
    return values
