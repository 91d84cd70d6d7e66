"""DPO's driver side: its keys, its engines (the policy; the frozen reference unless the loss needs none, LoRA
switches the adapters off, or its log-probs are precomputed; the judge's reward models), its data share."""

from __future__ import annotations

from omegaconf import DictConfig

from runner.driver import checks
from runner.errors import ConfigError
from runner.stages.base import Method, Source


def reference_mode(cfg: DictConfig) -> str:
    """none (a reference-free loss) | adapters (LoRA: the policy with its adapters off, no second copy) |
    precompute (log-probs computed once, then the reference is freed) | engine (a frozen DeepSpeed engine)."""
    from runner.rl.preference import get

    step = cfg.step
    if not get(str(step.loss)).needs_reference:
        return "none"
    if step.precompute_reference:
        return "precompute"
    if int(cfg.lora.r) and step.reference_from is None:
        return "adapters"
    return "engine"


class DPO(Method):
    name = "dpo"
    data = "pairs"
    judged = True
    shares = ("dpo", "reward")  # its own share if data.split names one, else the reward model's (DS-Chat's step 2)
    sources = (
        Source("init_from", ("causal_lm",), "a causal LM (an SFT export)", "outputs/sft/<run>/export", trains=True),
        Source("reference_from", ("causal_lm",), "a causal LM", "outputs/sft/<run>/export", optional=True),
    )
    exports = {"export": "causal_lm"}
    recipe = "runner.stages.dpo.recipe:run"

    def validate(self, cfg: DictConfig, notes: list[str]) -> None:
        from runner.rl.preference import LOSSES

        step = cfg.step
        if step.loss not in LOSSES:
            raise ConfigError("step.loss", f"unknown preference loss {step.loss!r}", f"use one of {', '.join(LOSSES)}")
        checks.positive(cfg, "step.beta", example="0.1")
        checks.in_range(cfg, 0, 0.5, "step.label_smoothing")
        checks.non_negative(cfg, "step.gamma", "step.sft_coef")
        free = not LOSSES[step.loss].needs_reference
        if free and (step.reference_from is not None or step.precompute_reference):
            raise ConfigError(
                "step.reference_from" if step.reference_from is not None else "step.precompute_reference",
                f"step.loss={step.loss} is reference-free: it uses no reference model",
                "remove the reference setting, or choose a loss that uses one (sigmoid, ipo, hinge)",
            )
        if step.label_smoothing and step.loss != "sigmoid":
            raise ConfigError(
                "step.label_smoothing",
                f"applies to step.loss=sigmoid only, not {step.loss}",
                "set step.label_smoothing=0, or step.loss=sigmoid",
            )
        if step.reference.get("zero") is not None:
            checks.zero(step.reference.zero, "step.reference.zero")
        mode = reference_mode(cfg)
        notes.append(
            {
                "none": f"step.loss={step.loss}: no reference model",
                "adapters": "LoRA: the reference is the policy with its adapters switched off (no second copy)",
                "precompute": "the reference's log-probs are computed once (cached with the data), then it is freed",
                "engine": "the reference is a frozen copy of the starting model",
            }[mode]
        )

    def workload(self, cfg: DictConfig, world: int) -> list:
        """Chosen and rejected through the policy, and through the reference without gradients (unless the loss
        needs none or its log-probs were precomputed)."""
        from runner.driver.estimate import Pass

        micro, gas, s = (
            int(cfg.train.micro_batch_size),
            int(cfg.train.gradient_accumulation_steps),
            int(cfg.data.max_seq_len),
        )
        passes = [Pass("", "train", 2 * micro, s, times=gas, what="policy training")]
        mode = reference_mode(cfg)
        if mode in ("engine", "adapters"):
            ref = "reference" if mode == "engine" else ""
            passes.append(Pass(ref, "forward", 2 * micro, s, times=gas, what="reference log-probs"))
        return passes

    def engine_sources(self, cfg: DictConfig) -> dict[str, str | None]:
        return {**super().engine_sources(cfg), "reference": cfg.step.reference_from}

    def engine_configs(self, cfg: DictConfig, world: int, total_steps: int, run_dir: str) -> dict[str, dict]:
        """The policy's; the reference's (ZeRO-3 if the policy is, or step.reference.zero / .offload); the judge's
        reward models'."""
        from runner.driver.ds_config import build_ds_config, inference_config, judge_configs

        configs = {"": build_ds_config(cfg, world, total_steps, run_dir)}
        micro = 2 * int(cfg.train.micro_batch_size)  # chosen and rejected in one forward pass
        if reference_mode(cfg) in ("engine", "precompute"):
            ref = cfg.step.reference
            stage = int(ref.zero.stage) if ref.get("zero") is not None else int(cfg.zero.stage)
            configs["reference"] = inference_config(cfg, world, micro, stage, bool(ref.offload))
        return {**configs, **judge_configs(cfg, world, micro)}
