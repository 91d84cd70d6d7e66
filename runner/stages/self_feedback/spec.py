"""Self-feedback SFT's driver side: its keys (rounds, candidates, the acceptance rule, alpha or its schedule), its
data (SFT rows: their prompts are generated for, their responses are L_data's), its engines (the policy and the
judge's reward models) and its length (train.max_steps = step.rounds x step.steps_per_round)."""

from __future__ import annotations

from omegaconf import DictConfig, ListConfig

from runner.driver import checks
from runner.errors import ConfigError
from runner.stages.base import Method, Source
from runner.stages.grpo.spec import GRPO

RULES = ("best", "threshold", "beat_reference")


def alphas(cfg: DictConfig) -> list[float]:
    """alpha for each round: step.alpha, one number or a list with one per round."""
    alpha, rounds = cfg.step.alpha, int(cfg.step.rounds)
    return [float(a) for a in alpha] if isinstance(alpha, (list, ListConfig)) else [float(alpha)] * rounds


class SelfFeedback(Method):
    adapts_batch = False  # (its steps draw micro-batches of SFT rows and kept answers)
    name = "self_feedback"
    data = "sft"  # prompts to generate for, and the responses L_data learns
    judged = True
    shares = ("self_feedback", "ppo")  # its own share if data.split names one, else the prompt share (PPO's)
    sources = (
        Source("init_from", ("causal_lm",), "a causal LM (an SFT export)", "outputs/sft/<run>/export", trains=True),
    )
    exports = {"export": "causal_lm"}
    recipe = "runner.stages.self_feedback.recipe:run"

    def has_rank_state(self, cfg: DictConfig) -> bool:
        return True  # each rank trains on the answers it generated this round

    def step_samples(self, cfg: DictConfig, world: int) -> tuple[int, str, str]:
        return (
            max(int(cfg.step.prompts_per_round), int(cfg.train.micro_batch_size)) * world,
            "step.prompts_per_round",
            "max(step.prompts_per_round, train.micro_batch_size) × world size rows",
        )

    def validate(self, cfg: DictConfig, notes: list[str]) -> None:
        step = cfg.step
        checks.positive_int(cfg, "step.rounds", "step.steps_per_round", "step.prompts_per_round", "step.candidates")
        checks.lengths(cfg, GRPO.positions(cfg), notes)
        checks.generation(cfg)
        checks.reward(cfg, required=True)
        rounds, per_round = int(step.rounds), int(step.steps_per_round)
        if cfg.train.max_steps not in (None, rounds * per_round):
            raise ConfigError(
                "train.max_steps",
                f"is {cfg.train.max_steps}, but self-feedback runs step.rounds x step.steps_per_round = "
                f"{rounds * per_round} steps",
                "set step.rounds and step.steps_per_round (and leave train.max_steps unset)",
            )
        cfg.train.max_steps = rounds * per_round
        values = alphas(cfg)
        if len(values) != rounds:
            raise ConfigError(
                "step.alpha", f"lists {len(values)} values for {rounds} rounds", "give one alpha, or one per round"
            )
        if any(not 0 <= a <= 1 for a in values):
            raise ConfigError("step.alpha", f"must be within [0, 1], got {values}", "e.g. step.alpha=0.5")
        rule = step.accept.rule
        if rule not in RULES:
            raise ConfigError("step.accept.rule", f"unknown rule {rule!r}", f"use one of {', '.join(RULES)}")
        if rule == "threshold" and not isinstance(step.accept.threshold, (int, float)):
            raise ConfigError(
                "step.accept.threshold", "is needed by step.accept.rule=threshold", "e.g. step.accept.threshold=1.5"
            )
        if rule != "threshold" and step.accept.threshold is not None:
            raise ConfigError(
                "step.accept.threshold", f"is only read by step.accept.rule=threshold (the rule is {rule})"
            )
        if int(step.candidates) == 1 and rule == "best":
            notes.append("step.candidates=1 with step.accept.rule=best: every answer is kept (nothing is selected)")
        notes.append(
            f"self-feedback: {rounds} rounds of {per_round} steps; each round {step.prompts_per_round} prompts per "
            f"rank x {step.candidates} candidates, the best kept ({rule}); alpha "
            + str(values if len(set(values)) > 1 else values[0])
        )
