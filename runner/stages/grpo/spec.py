"""Critic-free online RL's driver side: its keys, its engines (the policy; the frozen reference unless the KL is off;
the judge's reward models: no critic), its prompts' share of the data."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from runner.driver import checks, rollouts
from runner.errors import ConfigError
from runner.paths import is_local_path
from runner.stages.base import Method, Source

PLACEMENTS = ("loss", "reward", "none")


def placement(cfg: DictConfig) -> str:
    """step.kl.placement, with `off` (and YAML's false) read as none."""
    value = cfg.step.kl.placement
    return "none" if value in (False, "off", None) else str(value)


def answers_per_step(cfg: DictConfig) -> int:
    """Answers each rank trains on per step: rollout.prompts x rollout.n."""
    return int(cfg.step.rollout.prompts) * int(cfg.step.rollout.n)


def optimizer_steps_per_step(cfg: DictConfig) -> int:
    """The answers in chunks of train.micro_batch_size, step.epochs times, one optimizer step per
    train.gradient_accumulation_steps chunks (validate checks that this divides)."""
    chunks = answers_per_step(cfg) // int(cfg.train.micro_batch_size) * int(cfg.step.epochs)
    return chunks // int(cfg.train.gradient_accumulation_steps)


class GRPO(Method):
    adapts_batch = False  # a step's chunks are fixed by its rollout (checks.chunks)
    name = "grpo"
    data = "prompts"
    judged = True
    shares = ("grpo", "ppo")  # its own share if data.split names one, else PPO's
    max_len_key = "step.max_prompt_len"
    sources = (
        Source("init_from", ("causal_lm",), "a causal LM (an SFT export)", "outputs/sft/<run>/export", trains=True),
    )
    exports = {"export": "causal_lm"}
    recipe = "runner.stages.grpo.recipe:run"
    trainer = "runner.stages.grpo.recipe:GRPOTask"

    def max_len(self, cfg: DictConfig) -> int:
        return int(cfg.step.max_prompt_len)

    def step_samples(self, cfg: DictConfig, world: int) -> tuple[int, str, str]:
        return (
            int(cfg.step.rollout.prompts) * world,
            "step.rollout.prompts",
            "step.rollout.prompts × world size prompts",
        )

    def rollout_answers(self, cfg: DictConfig) -> tuple[int, str]:
        return answers_per_step(cfg), "step.epochs"

    def validate(self, cfg: DictConfig, notes: list[str]) -> None:
        from runner.rl import advantages, kl, losses

        step = cfg.step
        name = str(step.advantage)
        if name not in advantages.REGISTRY or advantages.get(name).needs_values:
            free = sorted(k for k, v in advantages.REGISTRY.items() if not v.needs_values)
            hint = " (gae needs a critic: use step=ppo)" if name == "gae" else ""
            raise ConfigError(
                "step.advantage",
                f"{name!r} is not a critic-free advantage estimator{hint}",
                f"use one of {', '.join(free)}",
            )
        step.kl.placement = placement(cfg)
        if step.kl.placement not in PLACEMENTS:
            raise ConfigError(
                "step.kl.placement", f"unknown placement {step.kl.placement!r}", "use loss, reward or none"
            )
        if step.kl.estimator not in kl.KL_ESTIMATORS:
            raise ConfigError("step.kl.estimator", f"unknown KL estimator {step.kl.estimator!r}", "use k1, k2 or k3")
        if step.loss_agg not in losses.AGGREGATIONS:
            raise ConfigError(
                "step.loss_agg",
                f"unknown loss aggregation {step.loss_agg!r}",
                f"use one of {', '.join(losses.AGGREGATIONS)}",
            )
        checks.lengths(cfg, self.positions(cfg), notes)
        checks.generation(cfg)
        rollouts.backend(cfg, notes)
        rollouts.gathered_copy(cfg, int(cfg.zero.stage), notes)
        checks.positive_int(cfg, "step.rollout.n", "step.rollout.prompts", "step.epochs")
        checks.positive_int(cfg, "step.dynamic_sampling.max_batches", "step.overlong.buffer")
        checks.non_negative(cfg, "step.kl.coef", "step.cliprange_low", "step.cliprange_high", "step.overlong.factor")
        checks.in_range(cfg, 0, 1, "step.cliprange_low", "step.gamma")
        if step.dual_clip is not None and not (isinstance(step.dual_clip, (int, float)) and step.dual_clip > 1):
            raise ConfigError(
                "step.dual_clip", f"must be a number above 1 (or null: off), got {step.dual_clip!r}", "e.g. 3.0"
            )
        if step.overlong.enabled and int(step.overlong.buffer) >= int(step.generation.max_new_tokens):
            raise ConfigError(
                "step.overlong.buffer",
                f"{step.overlong.buffer} is not shorter than step.generation.max_new_tokens="
                f"{step.generation.max_new_tokens}: every answer would be punished",
                "use a buffer of a fraction of max_new_tokens (DAPO: 4096 of 20480)",
            )
        checks.reward(cfg, required=True)
        made_of = f"step.rollout.prompts {step.rollout.prompts} x step.rollout.n {step.rollout.n}"
        checks.chunks(cfg, answers_per_step(cfg), made_of, "step.epochs")
        if int(step.rollout.n) == 1 and name in ("grpo", "dr_grpo", "rloo"):
            notes.append(
                f"step.rollout.n=1: {name} compares a prompt's answers with each other; with one answer per prompt "
                "there is no baseline (the advantage is the score itself)"
            )
        notes.append(
            f"{name} advantages, no critic; "
            + (
                "no reference model (step.kl.placement=none)"
                if step.kl.placement == "none"
                else f"KL to the frozen reference in the {step.kl.placement} (coef {step.kl.coef})"
            )
        )

    @staticmethod
    def positions(cfg: DictConfig) -> int | None:
        """The policy's positions: its export's config.json, else the model preset's architecture."""
        start = str(cfg.step.init_from or cfg.model.path or "")
        if start and is_local_path(start) and (Path(start) / "config.json").is_file():
            found = json.loads((Path(start) / "config.json").read_text()).get("max_position_embeddings")
            if found:
                return int(found)
        return OmegaConf.select(cfg, "model.arch.max_position_embeddings")

    def workload(self, cfg: DictConfig, world: int) -> list:
        """Generation of rollout.prompts x rollout.n answers, the reference's log-probs (unless the KL is off) in
        batches of train.micro_batch_size prompts, then step.epochs passes of training chunks of micro answers."""
        from runner.driver.estimate import Pass

        step = cfg.step
        n, prompts, micro = int(step.rollout.n), int(step.rollout.prompts), int(cfg.train.micro_batch_size)
        prompt, new = int(step.max_prompt_len), int(step.generation.max_new_tokens)
        passes = [
            Pass("", "generate", prompts * n, prompt, new=new, what="generation"),
            Pass("", "forward", micro * n, prompt + new, times=prompts / micro, what="experience: policy"),
            Pass("", "train", micro, prompt + new, times=prompts * n * int(step.epochs) / micro, what="training"),
        ]
        if placement(cfg) != "none":
            passes.insert(
                2,
                Pass(
                    "reference", "forward", micro * n, prompt + new, times=prompts / micro, what="experience: reference"
                ),
            )
        return passes

    def engine_configs(self, cfg: DictConfig, world: int, total_steps: int, run_dir: str) -> dict[str, dict]:
        """The policy's (over total_steps x optimizer_steps_per_step optimizer steps); the reference's unless the KL
        is off (ZeRO-3 when the policy is, or offloaded); the judge's reward models'."""
        from runner.driver.ds_config import build_ds_config, inference_config, judge_configs

        configs = {"": build_ds_config(cfg, world, total_steps * optimizer_steps_per_step(cfg), run_dir)}
        micro = answers_per_step(cfg)
        if placement(cfg) != "none":
            configs["reference"] = inference_config(
                cfg, world, micro, int(cfg.zero.stage), bool(cfg.step.reference.offload)
            )
        return {**configs, **judge_configs(cfg, world, micro)}
