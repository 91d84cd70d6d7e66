"""Did it work? The console's last words about a completed run, from its summary: the held-out objective at the end
against the first evaluation (step 0, the starting model, for methods that evaluate it; else the first
`train.eval_every`), by how much and whether that is better, and for a method that trains a policy its judge's
mean score of answers to held-out prompts before and after training. A change for the worse is a warning.
"""

from __future__ import annotations

POLICY_OBJECTIVES = ("reward_mean", "pass_rate")  # said by the held-out reward lines


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def objective(summary: dict, who: str) -> list[str]:
    """The held-out objective: its last value, where it started and how it moved (and a warning when it got worse)."""
    name, value, mode = summary.get("objective_name"), summary.get("objective"), summary.get("objective_mode")
    if not _number(value) or (name in POLICY_OBJECTIVES and _number(summary.get("eval_reward_gain"))):
        return []
    line = f"{who}held-out {name}: {value:.4g}"
    first, steps = summary.get("eval_first") or {}, summary.get("steps")
    before = first.get(name)
    if not _number(before) or first.get("step") == steps:
        return [line]
    change = value - before
    relative = f", {change / abs(before):+.1%}" if before else ""
    better = (change < 0) == (mode == "min") if change and mode in ("min", "max") else None
    judged = "" if better is None else ", better" if better else ", worse"
    if change:
        line += f" (from {before:.4g} at step {first['step']}: {change:+.4g}{relative}{judged})"
    else:
        line += f" (unchanged since step {first['step']})"
    if name == "loss" and _number(first.get("perplexity")) and _number(summary.get("eval_perplexity")):
        line += f"; perplexity {summary['eval_perplexity']:.4g} (from {first['perplexity']:.4g})"
    best = (summary.get("best") or {}).get(name)
    if _number(best) and best != value:
        line += f"; best {best:.4g}, kept in checkpoints/best"
    lines = [line]
    if better is False:
        lines.append(
            f"warning: {who}held-out {name} got worse during training ({before:.4g} at step {first['step']} -> "
            f"{value:.4g} at step {steps}); see eval/{name} in metrics.jsonl"
        )
    return lines


def policy(summary: dict, who: str) -> list[str]:
    """A policy's judged held-out reward (and pass rate) before and after training; a warning when it fell."""
    gain = summary.get("eval_reward_gain")
    if not _number(gain):
        return []
    judge = summary.get("eval_judge") or "the judge"
    lines = [
        f"{who}held-out reward ({judge}): {summary['eval_reward_initial']:.3f} before training -> "
        f"{summary['eval_reward_final']:.3f} after ({gain:+.3f})"
    ]
    if _number(summary.get("eval_pass_rate_final")):
        lines.append(
            f"{who}held-out pass rate: {summary['eval_pass_rate_initial']:.3f} before training -> "
            f"{summary['eval_pass_rate_final']:.3f} after"
        )
    if gain < 0:
        lines.append(
            f"warning: {who}the trained policy's answers to held-out prompts score lower than its starting "
            f"point's ({gain:+.3f} by {judge}): it got worse; see eval/reward_mean in metrics.jsonl"
        )
    return lines


def verdict(summary: dict, stage: str = "") -> list[str]:
    """The verdict's lines (those starting with `warning:` belong on stderr)."""
    who = f"{stage}: " if stage else ""
    return objective(summary, who) + policy(summary, who)
