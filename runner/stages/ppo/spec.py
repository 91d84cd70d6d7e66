"""PPO's driver side: its keys, its four engines and their DeepSpeed JSONs, the pretraining mixture's data."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from runner.driver import checks, rollouts
from runner.errors import ConfigError
from runner.paths import is_local_path
from runner.stages.base import Method, Source

ROLE_KEYS = ("zero", "lr", "weight_decay", "lora_r", "gradient_checkpointing")  # step.actor.* == step.critic.*


def optimizer_steps_per_step(cfg: DictConfig) -> int:
    """Optimizer steps of each training engine per PPO step: the experience (step.generation_batch_size x
    step.generation_batches answers per rank) in chunks of train.micro_batch_size, step.ppo_epochs times, one
    optimizer step per train.gradient_accumulation_steps chunks (validate checks that this divides)."""
    step, train = cfg.step, cfg.train
    chunks = int(step.generation_batch_size) * int(step.generation_batches) // int(train.micro_batch_size)
    return chunks * int(step.ppo_epochs) // int(train.gradient_accumulation_steps)


class PPO(Method):
    adapts_batch = False  # a step's chunks are fixed by its rollout (checks.chunks)
    name = "ppo"
    data = "prompts"
    judged = True
    max_len_key = "step.max_prompt_len"
    sources = (
        Source("actor_from", ("causal_lm",), "a causal LM (an SFT export)", "outputs/sft/<run>/export", trains=True),
        Source(
            "critic_from", ("reward_model", "critic"), "a reward model (a reward export)", "outputs/reward/<run>/export"
        ),
        Source(
            "reward_from",
            ("reward_model",),
            "a reward model (a reward export)",
            "outputs/reward/<run>/export",
            optional=True,
        ),
    )
    exports = {"export": "causal_lm", "export_critic": "critic", "export_ema": "causal_lm"}
    recipe = "runner.stages.ppo.recipe:run"
    trainer = "runner.stages.ppo.recipe:PPOTask"
    checkpointed = ("", "critic")

    def has_rank_state(self, cfg: DictConfig) -> bool:
        return bool(cfg.step.ema.enabled)  # the EMA of each rank's partition

    def max_len(self, cfg: DictConfig) -> int:
        return int(cfg.step.max_prompt_len)

    def step_samples(self, cfg: DictConfig, world: int) -> tuple[int, str, str]:
        step = cfg.step
        return (
            int(step.generation_batch_size) * world * int(step.generation_batches),
            "step.generation_batch_size",
            "step.generation_batch_size × world size × step.generation_batches prompts",
        )

    def rollout_answers(self, cfg: DictConfig) -> tuple[int, str]:
        return int(cfg.step.generation_batch_size) * int(cfg.step.generation_batches), "step.ppo_epochs"

    def validate(self, cfg: DictConfig, notes: list[str]) -> None:
        step = cfg.step
        if step.reward_from is None:
            step.reward_from = step.critic_from
        checks.roles(cfg, "actor", "critic", notes=notes)
        checks.lengths(cfg, self.positions(cfg), notes)
        checks.positive_int(
            cfg,
            "step.generation_batch_size",
            "step.generation_batches",
            "step.ppo_epochs",
            "step.max_prompt_len",
            "step.generation.max_new_tokens",
        )
        step_made_of = (
            f"step.generation_batch_size {step.generation_batch_size} x step.generation_batches "
            f"{step.generation_batches}"
        )
        answers, epochs_key = self.rollout_answers(cfg)
        checks.chunks(cfg, answers, step_made_of, epochs_key)
        from runner.rl import advantages

        if step.advantage not in advantages.REGISTRY or not advantages.get(step.advantage).needs_values:
            with_critic = sorted(k for k, v in advantages.REGISTRY.items() if v.needs_values)
            raise ConfigError(
                "step.advantage",
                f"{step.advantage!r} is not an advantage estimator PPO can use with its critic",
                f"use one of {', '.join(with_critic)}",
            )
        if step.kl.type not in ("fixed", "adaptive"):
            raise ConfigError("step.kl.type", f"unknown KL controller {step.kl.type!r}", "use fixed or adaptive")
        checks.in_range(cfg, 0, 1, "step.gamma", "step.lam", "step.ema.beta")
        checks.generation(cfg)
        rollouts.backend(cfg, notes, bool(step.hybrid_engine.enabled))
        rollouts.gathered_copy(cfg, int(step.actor.zero.stage), notes, bool(step.hybrid_engine.enabled))
        checks.positive(cfg, "step.cliprange", "step.cliprange_value", example="0.2")
        checks.non_negative(
            cfg,
            "step.kl.coef",
            "step.clip_reward_value",
            "step.cliprange",
            "step.cliprange_value",
            "step.value_loss_coef",
            "step.entropy_coef",
            "step.unsupervised.coef",
        )
        if step.kl.type == "adaptive" and not step.kl.target > 0:
            raise ConfigError("step.kl.target", f"must be positive for the adaptive controller, got {step.kl.target}")

    @staticmethod
    def positions(cfg: DictConfig) -> int | None:
        """The actor's positions: its export's config.json, else the model preset's architecture."""
        actor = str(cfg.step.actor_from)
        if is_local_path(actor) and (Path(actor) / "config.json").is_file():
            found = json.loads((Path(actor) / "config.json").read_text()).get("max_position_embeddings")
            if found:
                return int(found)
        return OmegaConf.select(cfg, "model.arch.max_position_embeddings")

    def check_sources(self, cfg: DictConfig) -> None:
        from runner.driver.tokenizers import same_tokenizers

        same_tokenizers(cfg, ("actor_from", "critic_from", "reward_from"))

    def prepare_extra(self, cfg: DictConfig, tokenizer, cache_root: Path) -> dict | None:
        uns = cfg.step.unsupervised
        if not uns.path:
            return None
        from runner.data.prepare import prepare_text_blocks

        block = int(uns.block_size or int(cfg.step.max_prompt_len) + int(cfg.step.generation.max_new_tokens))
        spec = OmegaConf.create({k: uns[k] for k in ("path", "config_name", "split", "field")})
        return {"unsupervised": prepare_text_blocks(spec, "step.unsupervised", tokenizer(), block, cache_root)}

    def workload(self, cfg: DictConfig, world: int) -> list:
        """Per rollout batch: generation (the actor's KV cache), then the actor, reference, critic and reward model
        score the answers; then ppo_epochs passes of actor and critic training chunks."""
        from runner.driver.estimate import Pass

        step = cfg.step
        g, prompt, new = int(step.generation_batch_size), int(step.max_prompt_len), int(step.generation.max_new_tokens)
        batches, micro, full = int(step.generation_batches), int(cfg.train.micro_batch_size), prompt + new
        chunks = g * batches * int(step.ppo_epochs) / micro
        return [
            Pass("", "generate", g, prompt, new=new, times=batches, what="generation"),
            Pass("", "forward", g, full, times=batches, what="experience: actor"),
            Pass("reference", "forward", g, full, times=batches, what="experience: reference"),
            Pass("critic", "forward", g, full, head="value", times=batches, what="experience: critic"),
            Pass("reward", "forward", g, full, head="value", times=batches, what="experience: reward model"),
            Pass("", "train", micro, full, times=chunks, what="actor training"),
            Pass("critic", "train", micro, full, head="value", times=chunks, what="critic training"),
        ]

    def engine_sources(self, cfg: DictConfig) -> dict[str, str | None]:
        step = cfg.step
        return {**super().engine_sources(cfg), "critic": step.critic_from, "reward": step.reward_from}

    def engine_configs(self, cfg: DictConfig, world: int, total_steps: int, run_dir: str) -> dict[str, dict]:
        """The four engines from the same resolved config:

        ""         the actor: build_ds_config with step.actor's zero, lr and weight decay over
                   total_steps x optimizer_steps_per_step(cfg) optimizer steps, + hybrid_engine = step.hybrid_engine
        critic     the same with step.critic's, and no monitor (the actor's logs the run)
        reference  inference_config: ZeRO-3 if the actor is ZeRO-3 or step.reference.offload
        reward     inference_config: ZeRO-3 if the critic is ZeRO-3 or step.reward_model.offload
        judge<i>   the evaluation's reward models (reward=model), when the config names them
        """
        from runner.driver.ds_config import build_ds_config, inference_config, judge_configs

        steps = total_steps * optimizer_steps_per_step(cfg)
        actor = build_ds_config(role_config(cfg, "actor"), world, steps, run_dir)
        he = OmegaConf.to_container(cfg.step.hybrid_engine, resolve=True)
        if he.get("enabled"):
            actor["hybrid_engine"] = he
        micro = int(cfg.step.generation_batch_size)
        return {
            "": actor,
            "critic": build_ds_config(role_config(cfg, "critic", monitor=False), world, steps, run_dir),
            "reference": inference_config(
                cfg, world, micro, int(cfg.step.actor.zero.stage), bool(cfg.step.reference.offload)
            ),
            "reward": inference_config(
                cfg, world, micro, int(cfg.step.critic.zero.stage), bool(cfg.step.reward_model.offload)
            ),
            **judge_configs(cfg, world, micro),
        }


def role_config(cfg: DictConfig, role: str, monitor: bool = True) -> DictConfig:
    """The run's config as one trained model (step.<role>) sees it: its zero, learning rate and weight decay."""
    block = cfg.step[role]
    out = copy.deepcopy(cfg)
    out.zero = block.zero
    out.optimizer.lr, out.optimizer.weight_decay = block.lr, block.weight_decay
    if not monitor:
        out.logger.name = "none"
    return out
