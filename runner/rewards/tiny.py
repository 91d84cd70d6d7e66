"""The tiny task's ground truth (runner/assets/tiny_data): an answer should read "the <item> was <adj> and <adj> ."
and its adjectives should be positive. Score = 1 for the format + the share of positive words among the sentiment
words in the answer: 0 (a malformed, negative answer) to 2 (a well-formed, all-positive one). The word lists are
the ones the data was generated from (scripts/make_tiny_assets.py imports them from here)."""

from __future__ import annotations

import re

# fmt: off
POSITIVE = [
    "good", "great", "lovely", "nice", "wonderful", "excellent", "pleasant",
    "charming", "delightful", "superb", "fantastic", "perfect", "beautiful",
    "brilliant", "amazing", "cheerful", "elegant", "splendid", "cozy", "fresh",
]
NEGATIVE = [
    "bad", "awful", "terrible", "horrible", "ugly", "boring", "nasty",
    "dreadful", "poor", "dull", "broken", "dirty", "gloomy", "rude", "noisy",
    "smelly", "shabby", "rotten", "bland", "messy",
]
# fmt: on
FORMAT = re.compile(r"^the (\w+) was (\w+) and (\w+) \.$")


def well_formed(answer: str) -> bool:
    found = FORMAT.match(answer.strip())
    return bool(found) and found.group(2) in POSITIVE + NEGATIVE and found.group(3) in POSITIVE + NEGATIVE


def positive_share(answer: str) -> float:
    words = answer.split()
    pos, neg = sum(w in POSITIVE for w in words), sum(w in NEGATIVE for w in words)
    return pos / (pos + neg) if pos + neg else 0.0


def ground_truth(prompts: list[str], answers: list[str], rows: list[dict] | None = None) -> list[float]:
    """Per answer: 1 if it has the task's format, plus the share of its sentiment words that are positive."""
    return [float(well_formed(a)) + positive_share(a) for a in answers]
