"""Reward terms any task can use."""

from __future__ import annotations

import re


def format_regex(
    prompts: list[str], answers: list[str], rows: list[dict] | None = None, pattern: str = ".*", flags: str = "s"
) -> list[float]:
    """1.0 for an answer the regular expression matches in full (re.fullmatch, flags from 'imsx'), else 0.0."""
    compiled = re.compile(pattern, sum(getattr(re, f.upper()) for f in flags))
    return [float(compiled.fullmatch(a.strip()) is not None) for a in answers]


def length_penalty(
    prompts: list[str], answers: list[str], rows: list[dict] | None = None, max_words: int = 100, per_word: float = 0.01
) -> list[float]:
    """-per_word for every word past max_words (0 for answers within it)."""
    return [-per_word * max(0, len(a.split()) - max_words) for a in answers]
