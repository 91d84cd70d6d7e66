"""What the driver knows about a training method: one `Method` per `runner/stages/<name>/` package.

The driver, the planner, the data layer, the DeepSpeed-JSON builder and the pipeline call these hooks and never name a
method. A method overrides what differs from a supervised stage that trains one model:

    name      the `step=` value (and the folder)
    data      which rows it reads and how they are tokenised: "sft" (prompt + target), "pairs" (prompt, chosen,
              rejected) or "prompts" (prompt, plus the row's extra fields), see runner.data.kinds
    shares    the data.split keys it reads, the first present wins (DPO reads "dpo", else the reward share)
    sources   models it reads from earlier runs (step keys such as actor_from), checked and wired by the pipeline
    exports   export directory -> kind of model it holds (causal_lm, reward_model, critic)
    recipe    "module:function" that every rank runs
    trainer   "module:Class" of its step-by-step trainer for a loop of your own (runner.api), or None
    packs     whether data.packing=true applies (single sequences with a per-token loss: SFT)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

from omegaconf import DictConfig, OmegaConf


@dataclasses.dataclass(frozen=True)
class Source:
    """A model a method starts from or reads: an earlier run's export, named by `step.<key>`."""

    key: str  # step key, e.g. "actor_from"
    kinds: tuple[str, ...]  # export kinds accepted (runner.paths.export_kind)
    what: str  # "a causal LM (an SFT export)"
    example: str  # where such a directory comes from
    trains: bool = False  # the trained model starts from it: model.path and model.tokenizer follow it
    optional: bool = False  # a pipeline wires it only with step.init_from_previous=true


class Method:
    name: ClassVar[str]
    data: ClassVar[str] = "sft"
    shares: ClassVar[tuple[str, ...]] = ()
    sources: ClassVar[tuple[Source, ...]] = ()
    exports: ClassVar[dict[str, str]] = {"export": "causal_lm"}
    recipe: ClassVar[str]
    trainer: ClassVar[str | None] = None  # generate_experience(rows=None) / train(rollout, step): runner.api.Session
    checkpointed: ClassVar[tuple[str, ...]] = ("",)  # engines its checkpoints hold, by JSON name ("" = the main one)
    max_len_key: ClassVar[str] = "data.max_seq_len"  # the key that bounds a tokenised sample (see max_len)
    judged: ClassVar[bool] = False  # it trains a policy: the `reward` group judges its answers to held-out prompts
    adapts_batch: ClassVar[bool] = True  # train.adapt may change its gradient accumulation (per-batch losses)
    packs: ClassVar[bool] = False  # data.packing=true may put several of its samples in one row (runner.data.packing)

    def share_keys(self) -> tuple[str, ...]:
        return self.shares or (self.name,)

    def validate(self, cfg: DictConfig, notes: list[str]) -> None:
        """Check and resolve the method's own keys (cfg.step and what it implies). Raise ConfigError."""

    def has_rank_state(self, cfg: DictConfig) -> bool:
        """Whether each rank keeps state of its own beside the engines (it cannot move to another number of ranks)."""
        return False

    def check_sources(self, cfg: DictConfig) -> None:
        """Deeper checks of the models it reads, once they exist (e.g. that their tokenizers agree)."""

    def max_len(self, cfg: DictConfig) -> int:
        """The longest tokenised sample (prompt only, for methods that generate answers)."""
        return int(cfg.data.max_seq_len)

    def step_samples(self, cfg: DictConfig, world: int) -> tuple[int, str, str]:
        """Samples one optimizer step consumes, the key to name when the data holds fewer, and how it is made up."""
        train = cfg.train
        rows = " packed rows (data.packing)" if cfg.data.get("packing") else ""
        return (
            int(train.micro_batch_size) * world * int(train.gradient_accumulation_steps),
            "train.micro_batch_size",
            f"micro_batch_size × world size × gradient_accumulation_steps{rows}",
        )

    def rollout_answers(self, cfg: DictConfig) -> tuple[int, str] | None:
        """On-policy methods: the answers each rank trains on per step and the key of their passes over them (their
        training chunks, runner.driver.checks.chunks); None for methods that train on a data set's batches."""
        return None

    def workload(self, cfg: DictConfig, world: int) -> list:
        """The passes of one training step on each rank (runner.driver.estimate.Pass), for the memory plan and the
        time estimate: by default a training pass of train.micro_batch_size samples of data.max_seq_len tokens (the
        longest a padded batch can be) per micro-step."""
        from runner.driver.estimate import Pass

        micro, gas = int(cfg.train.micro_batch_size), int(cfg.train.gradient_accumulation_steps)
        return [Pass("", "train", micro, int(cfg.data.max_seq_len), times=gas, what="training")]

    def prepare_extra(self, cfg: DictConfig, tokenizer, cache_root: Path) -> dict | None:
        """Data beside the stage's rows (PPO's pretraining mixture), prepared by the driver; recorded in runtime.
        `tokenizer()` returns the run's tokenizer (loaded when first asked for)."""
        return None

    def engine_sources(self, cfg: DictConfig) -> dict[str, str | None]:
        """The model each engine beside the trained one loads (None: a copy of the trained model), for the memory
        plan; the judge's reward models by default."""
        terms = OmegaConf.select(cfg, "reward.terms") or []
        return {f"judge{i}": str(t.model) for i, t in enumerate(terms) if t.get("model")}

    def engine_configs(self, cfg: DictConfig, world: int, total_steps: int, run_dir: str) -> dict[str, dict]:
        """Every DeepSpeed engine's JSON: "" is the trained model's (ds_config.json), others ds_config.<name>.json
        (the judge's reward models, judge<i>, for a method that trains a policy)."""
        from runner.driver.ds_config import build_ds_config, judge_configs

        configs = {"": build_ds_config(cfg, world, total_steps, run_dir)}
        return {**configs, **judge_configs(cfg, world, int(cfg.train.micro_batch_size))} if self.judged else configs
