"""Verifiable math answers (GSM8K, MATH): does the answer's final result equal the reference answer? The final
result is the last \\boxed{...} of the answer, else what follows its last `####` (GSM8K's convention), else its last
number; the reference is read the same way (GSM8K references end in `#### 72`). Equality is decided by Hugging
Face's math-verify (numbers, fractions, LaTeX expressions, sets), not by string comparison."""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def final_answer(text: str) -> str | None:
    """The final result a solution states: its last \\boxed{...}, else what follows `####`, else its last number."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().split("\n")[0].strip() or None
    numbers = NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{") - 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def same(answer: str | None, reference: str | None) -> bool:
    if answer is None or reference is None:
        return False
    try:
        from math_verify import parse, verify
    except ImportError as exc:  # a dependency of the runner; an environment without it says so
        raise RuntimeError("runner.rewards.math needs math-verify: pip install 'math-verify[antlr4_9_3]'") from exc
    gold, guess = parse(f"${reference}$"), parse(f"${answer}$")
    if not gold or not guess:  # not parseable as math: compare the text
        return answer.strip().replace(",", "") == reference.strip().replace(",", "")
    return bool(verify(gold, guess))


def answer_matches(
    prompts: list[str], answers: list[str], rows: list[dict] | None = None, field: str = "reference"
) -> list[float]:
    """1.0 when an answer's final result equals its row's reference answer (rows[i][field]), else 0.0."""
    if rows is None or any(field not in r for r in rows):
        raise ValueError(
            f"every row needs a {field!r} field with the reference answer (map it with "
            "data.sets.<name>.fields.reference)"
        )
    return [float(same(final_answer(a), final_answer(str(r[field])))) for a, r in zip(answers, rows)]
