"""Rewards: how an answer is scored, for training (critic-free RL) and for the held-out evaluation every method that
trains a policy reports ("did it work?").

A reward is the `reward` config group: a weighted sum of terms, each a Python function named
`package.module:function` (called with a batch: the prompts, the answers and the rows' extra fields such as a
reference answer; it returns one float per answer) or a reward-model export (its score at the last token). Functions
shipped with the runner: `runner.rewards.tiny:ground_truth` (the tiny task), `runner.rewards.math:answer_matches`
(GSM8K/MATH answers, with math-verify), `runner.rewards.common:format_regex`, `runner.rewards.common:length_penalty`.
A function that raises, returns the wrong count or a non-finite number stops the run, naming the function and the
row; it is never silently scored 0.
"""


def describe(reward) -> str | None:
    """The judge a `reward` config names, in words (None when it names none): "tiny:ground_truth" or
    "1.0 x math:answer_matches + 0.1 x format", a reward model by its path."""
    terms = list(reward.terms) if reward is not None and reward.get("terms") else []
    if not terms:
        return None
    parts = []
    for term in terms:
        what = (
            str(term.get("name") or str(term.fn).rsplit(".", 1)[-1]) if term.get("fn") else f"reward model {term.model}"
        )
        weight = float(term.get("weight", 1.0))
        parts.append(what if len(terms) == 1 and weight == 1.0 else f"{weight:g} x {what}")
    return " + ".join(parts)
