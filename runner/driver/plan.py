"""Planning a run: resolve every `auto` against the hardware, validate, and derive world size, batch and launcher.

Nothing here writes a file or starts a process; the driver does that once the plan is valid. What a method adds
(its own keys, the models it reads) comes from its `Method` (runner.stages).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from runner import modeling, stages
from runner.data import packing
from runner.driver import checks, hardware, optimizers, parallel
from runner.driver.deployment import Hardware, resolve_deployment, resolve_threads
from runner.errors import ConfigError
from runner.paths import is_local_path, local


@dataclasses.dataclass
class Plan:
    cfg: DictConfig  # resolved: no `auto` left
    world_size: int
    nodes: dict[str, int]  # host -> ranks
    notes: list[str]  # plain statements about choices made (printed and written to the run dir)
    method: object = None  # the step's runner.stages.base.Method

    @property
    def deployment(self) -> DictConfig:
        return self.cfg.deployment


def _resolve_precision(cfg: DictConfig, hw: Hardware, accelerator: str, notes: list[str]) -> None:
    prec = cfg.precision
    if prec.dtype == "auto":
        bf16 = hw.bf16 if hw.cuda_devices else bool(cfg.hardware.bf16)  # (planned GPUs: the hardware preset's)
        prec.dtype = ("bf16" if bf16 else "fp16") if accelerator == "cuda" else "fp32"
        notes.append(f"precision=auto chose {prec.dtype} for the {accelerator} accelerator")
    if prec.dtype not in ("fp32", "fp16", "bf16"):
        raise ConfigError("precision.dtype", f"unknown dtype {prec.dtype!r}", "use precision=fp32, fp16 or bf16")
    if prec.dtype == "bf16" and accelerator == "cuda" and hw.cuda_devices and not hw.bf16:
        raise ConfigError(
            "precision", "bf16 is not supported by these GPUs (it needs Ampere or newer)", "use precision=fp16"
        )
    if prec.dtype == "fp16" and accelerator == "cpu":
        raise ConfigError(
            "precision",
            "fp16 is not supported by DeepSpeed's CPU accelerator (it refuses it at initialisation)",
            "use precision=fp32 (fastest on CPU) or precision=bf16",
        )


def _resolve_optimizer(cfg: DictConfig, accelerator: str, notes: list[str]) -> None:
    # any trained model's ZeRO-Offload (the run's, or a method's own per model: step.critic.zero) needs DeepSpeed's
    offload = checks.offloads_optimizer(cfg.zero) or any(
        checks.offloads_optimizer(block.zero)
        for block in cfg.step.values()
        if isinstance(block, DictConfig) and isinstance(block.get("zero"), DictConfig)
    )
    optimizers.resolve(cfg, accelerator, offload, notes)


def _resolve_batch(cfg: DictConfig, world: int) -> None:
    """`world`: the data-parallel ranks (parallel.data): each tensor/sequence-parallel group trains on one batch."""
    train = cfg.train
    checks.positive_int(cfg, "train.micro_batch_size", "train.gradient_accumulation_steps")
    if train.global_batch_size is not None:
        checks.positive_int(cfg, "train.global_batch_size")
        per_step = train.micro_batch_size * world
        if not isinstance(train.global_batch_size, int) or train.global_batch_size % per_step:
            raise ConfigError(
                "train.global_batch_size",
                f"{train.global_batch_size} is not a multiple of "
                f"micro_batch_size × data-parallel ranks (parallel.data) = {train.micro_batch_size} × {world} = "
                f"{per_step}",
                f"use a multiple of {per_step}, or change train.micro_batch_size",
            )
        train.gradient_accumulation_steps = train.global_batch_size // per_step
    for key in ("max_steps", "epochs"):
        if train[key] is not None:
            checks.positive_int(cfg, f"train.{key}")
    if train.max_steps is None and train.epochs is None:
        raise ConfigError(
            "train.max_steps",
            "neither train.max_steps nor train.epochs is set",
            "set one of them, e.g. train.max_steps=1000",
        )


def _resolve_sources(cfg: DictConfig, method) -> str:
    """The models a method reads from earlier runs (step.<key>): each a hub id or a directory of the right kind; the
    trained model's starting point becomes model.path (and its tokenizer model.tokenizer)."""
    pending, model_key = bool(cfg.step.get("pending_exports")), "model.path"
    for src in method.sources:
        value = cfg.step.get(src.key)
        if value is None:
            continue
        resolved = checks.source(f"step.{src.key}", str(value), src.kinds, src.what, src.example, pending)
        cfg.step[src.key] = resolved
        if src.trains:
            model_key = f"step.{src.key}"
            cfg.model.path = resolved
            path = local(resolved)
            if not is_local_path(resolved) or not path.exists() or (path / "tokenizer_config.json").is_file():
                cfg.model.tokenizer = resolved
    return model_key


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
ARCH_SKIP = ("architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "auto_map")
CONF = Path(__file__).resolve().parent.parent.parent / "conf"


def _preset_path(name) -> str | None:
    """The checkpoint a model preset names (conf/model/<name>.yaml `path`), or None."""
    preset = CONF / "model" / f"{name}.yaml"
    return OmegaConf.load(preset).get("path") if name and preset.is_file() else None


def _checkpoint_config(path: str) -> dict | None:
    """config.json of a local model directory, or of a hub model in the local Hugging Face cache (None if neither)."""
    if is_local_path(path):
        return json.loads((local(path) / "config.json").read_text())
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(path, "config.json")
    except Exception:
        return None
    return json.loads(Path(found).read_text()) if isinstance(found, str) else None


def _validate_model(cfg: DictConfig, notes: list[str], key: str = "model.path") -> None:
    """The model the user named is the model that is planned and trained: a local directory must hold a config,
    weights and (when it is the tokenizer too) tokenizer files; a model that is not its preset's own checkpoint
    brings its architecture (model.arch, for planning) from its config.json."""
    model = cfg.model
    if model.path is None:
        if not model.get("arch"):
            raise ConfigError(
                "model.path", "no checkpoint path and no `arch` to build a model from", "set model.path=HUB_ID_OR_DIR"
            )
        return
    path = str(model.path)
    if is_local_path(path):
        if cfg.step.get("pending_exports") and not local(path).exists():
            return  # an earlier stage of this pipeline writes it
        if not local(path).is_dir():
            raise ConfigError(
                key,
                f"{path!r} is not a directory (nor a hub id like facebook/opt-1.3b)",
                "point model.path at a Hugging Face model directory",
            )
        if not (local(path) / "config.json").is_file():
            raise ConfigError(
                key,
                f"{path!r} is not a Hugging Face model directory: it has no config.json",
                "point model.path at a directory written by save_pretrained()",
            )
        checks.has_weights(local(path), key)
    tok = str(model.tokenizer)
    if is_local_path(tok) and local(tok).is_dir() and not any((local(tok) / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(
            "model.tokenizer",
            f"{tok!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)})",
            "set model.tokenizer to a directory or hub id that has them",
        )
    if path == _preset_path(model.get("name")):
        return  # the preset's own checkpoint: its figures are this model's
    config = _checkpoint_config(path)
    if config is None:
        notes.append(
            f"model.path={path} is not in the local Hugging Face cache: the plan uses the architecture of "
            f"the model={model.get('name')} preset until it is downloaded"
        )
        return
    model.arch = {k: v for k, v in config.items() if k not in ARCH_SKIP and not k.startswith("_")}
    model.num_params = model.largest_layer_params = None  # counted from this architecture


def _validate_data(cfg: DictConfig, method, notes: list[str]) -> None:
    from runner.data import templates
    from runner.data.prepare import DS_CHAT_SPLIT, split_shares

    data = cfg.data
    if not data.sets:
        raise ConfigError("data", "no data set is chosen", "choose one or more from conf/data, e.g. data=tiny")
    if data.split is None:
        data.split = dict(zip(DS_CHAT_SPLIT, (2, 4, 4)))
    raw = OmegaConf.to_container(data.split) if OmegaConf.is_config(data.split) else data.split
    if isinstance(raw, str) and raw.strip():  # data.split=sft (or sft_only): every row of every set to that share
        raw = {raw.strip().removesuffix("_only"): 1}
    if isinstance(raw, list) and len(raw) != 3:
        raise ConfigError(
            "data.split",
            f"a list gives the shares of sft, reward and ppo (DeepSpeed-Chat's "
            f"data_split), so it needs three numbers, got {raw}",
            "e.g. data.split=[2,4,4], or name the shares: 'data.split={sft:2,dpo:8}'",
        )
    shares = split_shares(raw) if isinstance(raw, (list, dict)) else None
    if (
        not shares
        or any(not isinstance(x, (int, float)) or x < 0 for x in shares.values())
        or sum(shares.values()) <= 0
    ):
        raise ConfigError(
            "data.split",
            f"must map stage names to non-negative shares, got {raw}",
            "e.g. 'data.split={sft:2,reward:4,ppo:4}', DeepSpeed-Chat's data.split=[2,4,4], or data.split=sft "
            "(every row to one stage)",
        )
    data.split = shares
    share = next((k for k in method.share_keys() if k in shares), None)
    if share is None:
        raise ConfigError(
            "data.split",
            f"has no share for the {method.name} stage (it reads "
            f"{' or '.join(method.share_keys())}; data.split is {shares})",
            f"add one, e.g. 'data.split={{sft:2,{method.share_keys()[0]}:8}}', or give this stage every row: "
            f"data.split={method.share_keys()[0]}",
        )
    if shares[share] == 0 and any(not ds.sft_only for ds in data.sets.values()):
        raise ConfigError(
            "data.split",
            f"gives the {method.name} stage no rows (its share {share!r} is 0 in {shares})",
            "give this stage a positive share",
        )
    for key, allowed in (("overlong", ("truncate", "drop")), ("bad_rows", ("error", "skip"))):
        if data[key] not in allowed:
            raise ConfigError(f"data.{key}", f"unknown value {data[key]!r}", f"use {' or '.join(allowed)}")
    max_pos = OmegaConf.select(cfg, "model.arch.max_position_embeddings")
    if data.max_seq_len == "auto":
        data.max_seq_len = min(512, max_pos or 512)
    if not isinstance(data.max_seq_len, int) or data.max_seq_len < 2:
        raise ConfigError("data.max_seq_len", f"must be an integer of at least 2 (or auto), got {data.max_seq_len!r}")
    if max_pos and data.max_seq_len > max_pos:
        raise ConfigError(
            "data.max_seq_len",
            f"{data.max_seq_len} is longer than the model's {max_pos} positions (model.arch.max_position_embeddings)",
            f"set data.max_seq_len to at most {max_pos}",
        )
    for name, ds in data.sets.items():
        key = f"data.sets.{name}"
        path = str(ds.path)
        if is_local_path(path):
            if not local(path).exists():
                raise ConfigError(
                    f"{key}.path",
                    f"{path!r} does not exist",
                    "give a json/jsonl/csv/parquet file, a directory of split files, or a hub id",
                )
            if local(path).is_file() and not os.access(local(path), os.R_OK):
                raise ConfigError(f"{key}.path", f"{path!r} is not readable", "check the file's permissions")
        if ds.format not in ("pairs", "scored", "embedded"):
            raise ConfigError(f"{key}.format", f"unknown format {ds.format!r}", "use pairs, scored or embedded")
        if not isinstance(ds.weight, (int, float)) or ds.weight <= 0:
            raise ConfigError(f"{key}.weight", f"must be a positive number, got {ds.weight!r}")
        templates.check(ds, key, notes)


def resolved_copy(cfg: DictConfig) -> DictConfig:
    """A resolved copy of a composed config (every interpolation replaced); a missing mandatory value is a
    ConfigError naming it."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    try:
        OmegaConf.resolve(cfg)
    except MissingMandatoryValue as exc:
        key = exc.full_key or "config"
        raise ConfigError(key, "is required for this choice and has no value", f"set {key}=VALUE") from None
    except Exception as exc:  # interpolation errors name their key
        raise ConfigError(getattr(exc, "full_key", None) or "config", str(exc).splitlines()[0]) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key = missing[0]
        hint = " (a file, a directory of split files, or a hub id)" if key.startswith("data.sets.") else ""
        raise ConfigError(key, "is required for this choice and has no value", f"set {key}=VALUE{hint}")
    return cfg


def make_plan(cfg: DictConfig, hw: Hardware | None = None) -> Plan:
    """Resolve and validate a composed config. Raises ConfigError on bad input."""
    method = stages.get(str(cfg.step.name))
    packing.check(cfg.data.packing, method)  # first: whatever else the method would ask for, packing cannot apply
    cfg = resolved_copy(cfg)
    hw = hw or Hardware.detect()
    notes: list[str] = []
    world, nodes = resolve_deployment(cfg, hw, bool(cfg.dry_run), notes)
    hardware.resolve(cfg, hw, notes)
    _resolve_precision(cfg, hw, cfg.deployment.accelerator, notes)
    checks.zero(cfg.zero)
    _resolve_optimizer(cfg, cfg.deployment.accelerator, notes)
    parallel.resolve_degrees(cfg, world)
    _resolve_batch(cfg, int(cfg.parallel.data))
    model_key = _resolve_sources(cfg, method)
    method.validate(cfg, notes)
    checks.adapt(cfg, method.adapts_batch, notes)
    _validate_reward(cfg, method, notes)
    _validate_model(cfg, notes, model_key)
    resolve_threads(cfg, hw.cpus, notes, lambda: modeling.planned_params(cfg.model))
    _validate_data(cfg, method, notes)
    parallel.check(cfg, world, nodes, notes)
    if not isinstance(cfg.lora.r, int) or cfg.lora.r < 0:
        raise ConfigError("lora.r", f"must be a non-negative integer (0 = off), got {cfg.lora.r!r}")
    if cfg.logger.name == "wandb" and cfg.logger.mode not in ("auto", "online", "offline"):
        raise ConfigError("logger.mode", f"unknown wandb mode {cfg.logger.mode!r}", "use auto, online or offline")
    return Plan(cfg=cfg, world_size=world, nodes=nodes, notes=notes, method=method)


def _validate_reward(cfg: DictConfig, method, notes: list[str]) -> None:
    """The judge (`reward` group) of a method that trains a policy; for one that trains none, a note that it is unused
    (in a pipeline it judges the other stages)."""
    terms = OmegaConf.select(cfg, "reward.terms") or []
    if method.judged:
        checks.reward(cfg)
        if terms:  # the held-out answers are sampled with step.generation
            checks.generation(cfg)
            checks.positive_int(cfg, "step.generation.max_new_tokens")
    elif terms:
        notes.append(
            f"the reward group (reward=...) judges policies; step={method.name} trains none, so it is unused here"
        )


def pending_sources(cfg: DictConfig, method) -> list[str]:
    """Sources an earlier stage of this pipeline has not written yet (planned, not yet checked)."""
    return [
        src.key
        for src in method.sources
        if cfg.step.get(src.key) and is_local_path(str(cfg.step[src.key])) and not Path(str(cfg.step[src.key])).exists()
    ]
