"""Small validators the planner and the methods share. Each raises ConfigError naming the key, what is wrong and
the fix; none writes anything."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from runner.errors import ConfigError
from runner.paths import export_kind, is_local_path, local


def number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(key, f"must be a positive integer, got {value!r}")


def in_range(cfg: DictConfig, low: float, high: float, *keys: str) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if not number(value) or not low <= value <= high:
            raise ConfigError(key, f"must be a number in [{low}, {high}], got {value!r}")


def non_negative(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if not number(value) or value < 0:
            raise ConfigError(key, f"must be a non-negative number, got {value!r}")


def positive(cfg: DictConfig, *keys: str, example: str = "1e-5") -> None:
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if not number(value) or value <= 0:
            raise ConfigError(key, f"must be a positive number, got {value!r}", f"e.g. {key}={example}")


def zero(block: DictConfig, key: str = "zero") -> None:
    stage = block.stage
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{key}.stage", f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    param = OmegaConf.select(block, "offload_param.device", default="none")
    optim = OmegaConf.select(block, "offload_optimizer.device", default="none")
    if param not in ("none", None) and stage != 3:
        raise ConfigError(
            f"{key}.offload_param",
            f"parameter offload needs ZeRO stage 3, but {key}.stage={stage}",
            "use the stage3_offload option, or remove the offload_param block",
        )
    if optim not in ("none", None) and stage == 0:
        raise ConfigError(
            f"{key}.offload_optimizer",
            f"optimizer offload needs ZeRO stage 1, 2 or 3, but {key}.stage=0",
            "use the stage2_offload or stage3_offload option",
        )


def offloads_optimizer(block: DictConfig) -> bool:
    return OmegaConf.select(block, "offload_optimizer.device", default="none") not in ("none", None)


def roles(cfg: DictConfig, first: str, *others: str, notes: list[str]) -> None:
    """Trained models of a method with several (step.actor, step.critic): each block has the same keys (zero, lr,
    weight_decay, lora_r, gradient_checkpointing). The first role's zero defaults to the run's `zero` (and the run's
    `zero` becomes it); a later role's zero and lora_r default to the first role's."""
    step = cfg.step
    for i, role in enumerate((first, *others)):
        block, key = step[role], f"step.{role}"
        if block.get("zero") is None:
            source = cfg.zero if i == 0 else step[first].zero
            OmegaConf.update(cfg, f"{key}.zero", OmegaConf.to_container(source), force_add=True)
            if i:
                notes.append(
                    f"the {role} uses the {first}'s ZeRO stage {source.stage} (zero@{key}.zero=... sets its own)"
                )
        zero(block.zero, f"{key}.zero")
        if i == 0:
            cfg.zero = OmegaConf.to_container(block.zero)  # the run's ZeRO is the first role's (plans, reports)
        if block.get("lora_r") is None:
            block.lora_r = step[first].lora_r if i else cfg.lora.r
        positive(cfg, f"{key}.lr")
        non_negative(cfg, f"{key}.weight_decay")
        if not isinstance(block.lora_r, int) or block.lora_r < 0:
            raise ConfigError(f"{key}.lora_r", f"must be a non-negative integer (0 = off), got {block.lora_r!r}")
        if cfg.optimizer.impl == "torch" and offloads_optimizer(block.zero):
            raise ConfigError(
                "optimizer.impl",
                f"the {role}'s ZeRO-Offload needs DeepSpeed's CPU Adam",
                "use optimizer.impl=deepspeed",
            )


WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def has_weights(path: Path, key: str) -> None:
    if not any((path / w).is_file() for w in WEIGHTS) and not list(path.glob("*.safetensors")):
        raise ConfigError(
            key,
            f"{str(path)!r} has a config.json but no weights ({', '.join(WEIGHTS)})",
            "point it at a directory written by save_pretrained() (a run's export), with its weights",
        )


def source(step_key: str, value: str, kinds: tuple[str, ...], what: str, example: str, pending: bool) -> str:
    """A model another run produced (an export) or a hub id (not checked offline): returns it resolved."""
    if not is_local_path(value):
        return value
    path = local(value)
    if pending and not path.exists():  # an earlier stage of this pipeline writes it
        return str(path.resolve())
    if not (path / "config.json").is_file():
        raise ConfigError(
            step_key,
            f"{value!r} is not a model directory (no config.json); it must hold {what}",
            f"point it at {example}",
        )
    kind = export_kind(path)
    if kinds and kind not in kinds:
        raise ConfigError(
            step_key,
            f"{value!r} holds {'a ' + kind if kind else 'an unknown kind of model'}, but it must hold {what}",
            f"point it at {example}",
        )
    return str(path.resolve())


def lengths(cfg: DictConfig, positions: int | None, notes: list[str], default: int = 256) -> None:
    """step.max_prompt_len and step.generation.max_new_tokens of a method that generates: `auto` is DeepSpeed-Chat's
    256 each, capped to fit the model's positions (half for the prompt); prompt + answer must fit them."""
    step = cfg.step
    if step.max_prompt_len == "auto":
        step.max_prompt_len = min(default, positions // 2) if positions else default
        if positions and step.max_prompt_len < default:
            notes.append(f"step.max_prompt_len=auto: {step.max_prompt_len} (half of the model's {positions} positions)")
    positive_int(cfg, "step.max_prompt_len")
    gen = step.generation
    if gen.max_new_tokens == "auto":
        gen.max_new_tokens = min(default, positions - step.max_prompt_len) if positions else default
        if positions and gen.max_new_tokens < default:
            notes.append(
                f"step.generation.max_new_tokens=auto: {gen.max_new_tokens} (the model's {positions} "
                f"positions minus step.max_prompt_len)"
            )
    positive_int(cfg, "step.generation.max_new_tokens")
    total = int(step.max_prompt_len) + int(gen.max_new_tokens)
    if positions and total > positions:
        raise ConfigError(
            "step.max_prompt_len",
            f"prompt ({step.max_prompt_len}) + answer "
            f"(step.generation.max_new_tokens={gen.max_new_tokens}) = {total} tokens, more than the "
            f"model's {positions} positions",
            f"make step.max_prompt_len + step.generation.max_new_tokens at most {positions} (or leave both auto)",
        )


def generation(cfg: DictConfig, key: str = "step.generation") -> None:
    """Sampling settings of a method that generates (transformers' GenerationConfig would fail on the ranks)."""
    gen = OmegaConf.select(cfg, key)
    if gen.do_sample:
        positive(cfg, f"{key}.temperature", example="1.0")
        in_range(cfg, 0, 1, f"{key}.top_p")
        if not gen.top_p > 0:
            raise ConfigError(f"{key}.top_p", f"must be in (0, 1], got {gen.top_p}", f"e.g. {key}.top_p=1.0")
    if not isinstance(gen.top_k, int) or gen.top_k < 0:
        raise ConfigError(f"{key}.top_k", f"must be a non-negative integer (0 = off), got {gen.top_k!r}")
    positive(cfg, f"{key}.repetition_penalty", example="1.0")


def writable_dir(path: Path, key: str) -> None:
    """A directory the run will create or write into: its nearest existing ancestor must be a directory this user
    can write (probed with a temporary file, which is removed: root passes every permission check)."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            key, f"{path} cannot be created: {existing} is a file, not a directory", f"choose another {key}"
        )
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".runner-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(
            key,
            f"{path} cannot be written: {existing} is not writable ({exc.strerror})",
            f"choose a writable {key}, or fix the permissions of {existing}",
        ) from None
    if not os.access(existing, os.W_OK):
        raise ConfigError(key, f"{path} cannot be written: {existing} is not writable", f"choose a writable {key}")


def reward(cfg: DictConfig, required: bool = False, key: str = "reward") -> None:
    """The `reward` group's terms: each a function `package.module:function` that exists, or a reward-model export,
    with a numeric weight. `required`: the method trains on it (an empty reward is an error)."""
    import importlib

    terms = OmegaConf.select(cfg, f"{key}.terms") or []
    if required and not terms:
        raise ConfigError(
            key,
            "has no terms, and this method trains on the reward",
            "choose one: reward=tiny, reward=gsm8k, reward=model reward.terms.0.model=DIR, or your own",
        )
    for i, term in enumerate(terms):
        where = f"{key}.terms.{i}"
        if bool(term.get("fn")) == bool(term.get("model")):
            raise ConfigError(where, "needs exactly one of `fn` (package.module:function) or `model` (a reward export)")
        if not number(term.get("weight", 1.0)):
            raise ConfigError(f"{where}.weight", f"must be a number, got {term.get('weight')!r}")
        if term.get("fn"):
            module, sep, name = str(term.fn).partition(":")
            try:
                found = sep and hasattr(importlib.import_module(module), name)
            except ImportError as exc:
                raise ConfigError(
                    f"{where}.fn",
                    f"cannot import {module!r}: {exc}",
                    "give package.module:function of an importable module (on PYTHONPATH)",
                ) from None
            if not found:
                raise ConfigError(
                    f"{where}.fn",
                    f"{term.fn!r} is not package.module:function with that function",
                    "e.g. runner.rewards.tiny:ground_truth",
                )
        else:
            term.model = source(
                f"{where}.model",
                str(term.model),
                ("reward_model", "critic"),
                "a reward model (a reward export)",
                "outputs/reward/<run>/export",
                bool(cfg.step.get("pending_exports")),
            )


def chunks(cfg: DictConfig, answers: int, made_of: str, epochs_key: str) -> None:
    """An on-policy step's answers per rank split into training chunks of train.micro_batch_size, and the chunks of
    its epochs into whole optimizer steps (train.gradient_accumulation_steps chunks): an optimizer step never
    straddles two steps."""
    micro, gas = int(cfg.train.micro_batch_size), int(cfg.train.gradient_accumulation_steps)
    epochs = int(OmegaConf.select(cfg, epochs_key))
    if answers % micro:
        raise ConfigError(
            "train.micro_batch_size",
            f"one step's {answers} answers per rank ({made_of}) do not split into training chunks of "
            f"train.micro_batch_size={micro}",
            f"use a train.micro_batch_size that divides {answers}",
        )
    n = answers // micro * epochs
    if n % gas:
        raise ConfigError(
            "train.gradient_accumulation_steps",
            f"one step has {n} training chunks ({answers} answers / micro_batch_size {micro} x {epochs_key} "
            f"{epochs}), not a multiple of gradient_accumulation_steps={gas}: an optimizer step would straddle two "
            "steps",
            f"use a gradient_accumulation_steps that divides {n}",
        )


def adapt(cfg: DictConfig, adapts_batch: bool, notes: list[str]) -> None:
    """train.adapt's bounds and factors; the batch adapts only for a method with per-batch losses."""
    a = cfg.train.adapt
    if not a.enabled:
        return
    positive(cfg, "train.adapt.scale", "train.adapt.clip", "train.adapt.alpha", example="2.0")
    positive(cfg, "train.adapt.lr_scale_min", "train.adapt.lr_scale_max", "train.adapt.batch_beta", example="1.0")
    positive_int(cfg, "train.adapt.gas_min", "train.adapt.gas_max")
    for low, high in (("lr_scale_min", "lr_scale_max"), ("gas_min", "gas_max")):
        if a[low] > a[high]:
            raise ConfigError(f"train.adapt.{low}", f"{a[low]} is above train.adapt.{high}={a[high]}")
    if not a.lr_scale_min <= 1 <= a.lr_scale_max:
        raise ConfigError(
            "train.adapt.lr_scale_min", "the bounds must hold 1 (the schedule's own learning rate)", "e.g. 0.1 and 4"
        )
    gas = int(cfg.train.gradient_accumulation_steps)
    if a.batch_beta != 1 and not adapts_batch:
        raise ConfigError(
            "train.adapt.batch_beta",
            f"step={cfg.step.name} trains on fixed chunks of its rollouts: its batch cannot adapt",
            "leave train.adapt.batch_beta=1 (the learning rate still adapts)",
        )
    if a.batch_beta != 1 and not a.gas_min <= gas <= a.gas_max:
        raise ConfigError(
            "train.gradient_accumulation_steps",
            f"{gas} is outside train.adapt's bounds [{a.gas_min}, {a.gas_max}]",
            "start within the bounds",
        )
    if not int(cfg.train.eval_every):
        raise ConfigError("train.eval_every", "is 0: train.adapt decides after each evaluation", "e.g. 50")
    notes.append(
        f"train.adapt: after each evaluation, lr x {a.alpha}^r"
        + (f" and gradient accumulation x {a.batch_beta}^-r" if a.batch_beta != 1 else "")
        + f" (r: the objective's relative change / {a.scale}, within ±{a.clip})"
    )
