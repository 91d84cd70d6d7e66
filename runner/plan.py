"""Planning a run: resolve every `auto` against the hardware, validate, and derive world size, batch and launcher.

Nothing here writes a file or starts a process; the driver (runner.__main__) does that once the plan is valid.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from runner import launch
from runner.errors import ConfigError

SECRET_KEY = re.compile(r"(api_?key|token|secret|password)$", re.IGNORECASE)
STAGES = {"sft": 0, "reward": 1, "ppo": 2}  # each stage's index into data.split
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass
class Hardware:
    cuda_devices: int
    bf16: bool
    cpus: int

    @staticmethod
    def detect() -> "Hardware":
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return Hardware(cuda_devices=n, bf16=bool(n) and torch.cuda.is_bf16_supported(), cpus=launch.cpu_count())


@dataclasses.dataclass
class Plan:
    cfg: DictConfig                  # resolved: no `auto` left
    world_size: int
    nodes: dict[str, int]            # host -> ranks
    notes: list[str]                 # plain statements about choices made (printed and written to the run dir)

    @property
    def deployment(self) -> DictConfig:
        return self.cfg.deployment


def is_local_path(path: str) -> bool:
    """A path on disk, as opposed to a hub id such as `facebook/opt-1.3b`."""
    return (os.path.exists(os.path.expanduser(path)) or path.startswith(("/", "./", "../", "~"))
            or not HUB_ID.match(path))


def secret_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    found = []
    for key in cfg.keys() if isinstance(cfg, DictConfig) else []:
        full = f"{prefix}{key}"
        value = cfg._get_node(key)
        if isinstance(value, DictConfig):
            found += secret_keys(value, full + ".")
        elif SECRET_KEY.search(str(key)):
            found.append(full)
    return found


def _resolve_deployment(cfg: DictConfig, hw: Hardware, dry_run: bool, notes: list[str]) -> tuple[int, dict[str, int]]:
    dep = cfg.deployment
    if dep.name == "auto":
        dep.name = "single_node" if hw.cuda_devices else "cpu"
        dep.launcher = "deepspeed"
        notes.append(f"deployment=auto chose {dep.name} ({hw.cuda_devices} GPUs visible)")
        if dep.name == "cpu":
            dep.master_addr = "127.0.0.1"
    if dep.accelerator == "auto":
        dep.accelerator = "cuda" if hw.cuda_devices else "cpu"
    if dep.accelerator not in ("cpu", "cuda"):
        raise ConfigError("deployment.accelerator", f"unknown accelerator {dep.accelerator!r}", "use cpu or cuda")

    if dep.name == "slurm":  # inside the allocation: its nodes; planning outside it: the configured count
        nodelist = os.environ.get("SLURM_JOB_NODELIST")
        hosts = launch.slurm_hostnames(nodelist) if nodelist else []
        if hosts:
            dep.nnodes = int(os.environ.get("SLURM_NNODES", len(hosts)))
            dep.rdzv_id = os.environ.get("SLURM_JOB_ID", dep.rdzv_id)
        elif not dry_run:
            raise ConfigError("deployment", "deployment=slurm runs inside a SLURM allocation (submitted by Hydra's "
                              "submitit launcher), and this process is not in one", "run it without "
                              "hydra/launcher=basic, or use deployment=torchrun / multi_node on this machine")
        if dep.rdzv_endpoint == "auto":
            dep.rdzv_endpoint = f"{hosts[0] if hosts else 'FIRST_NODE'}:{dep.rdzv_port}"
            if not hosts:
                notes.append("deployment=slurm: the rendezvous host is the allocation's first node, known once the "
                             "job runs (FIRST_NODE in the command below)")
    if dep.name == "multi_node":
        hostfile = dep.hostfile
        if os.path.exists(hostfile):
            slots = launch.active_slots(dep, launch.parse_hostfile(hostfile))
            nodes = {h: len(s) for h, s in slots.items()}
        elif dry_run:
            nodes = {f"node{i}": int(dep.plan_gpus_per_node) for i in range(int(dep.plan_nodes))}
            notes.append(f"hostfile {hostfile} is not on this machine: the plan assumes {dep.plan_nodes} nodes x "
                         f"{dep.plan_gpus_per_node} GPUs (deployment.plan_nodes, deployment.plan_gpus_per_node)")
        else:
            raise ConfigError("deployment.hostfile", f"hostfile {hostfile!r} does not exist",
                              "write one line per node (`worker-1 slots=8`) and pass deployment.hostfile=PATH")
        if dep.nproc_per_node == "auto":
            dep.nproc_per_node = max(nodes.values())
        return sum(nodes.values()), nodes

    if dep.nproc_per_node == "auto":
        if dep.accelerator == "cpu":
            dep.nproc_per_node = 1
        elif hw.cuda_devices:
            dep.nproc_per_node = hw.cuda_devices
            if dep.launcher == "deepspeed":
                OmegaConf.update(dep, "all_visible", True, force_add=True)
        elif dry_run:
            dep.nproc_per_node = int(dep.plan_gpus_per_node)
            notes.append(f"no GPU is visible here: the plan assumes {dep.nproc_per_node} GPUs per node "
                         "(deployment.plan_gpus_per_node)")
        else:
            raise ConfigError("deployment", f"deployment={dep.name} needs CUDA GPUs and none is visible",
                              "use deployment=cpu on this machine")
    if dep.get("include"):  # deepspeed --include localhost:0,2
        host, _, slots = str(dep.include).partition(":")
        if host != "localhost" or not slots:
            raise ConfigError("deployment.include", f"on one node, include must be localhost:SLOTS, got {dep.include!r}",
                              "e.g. deployment.include=localhost:0,2")
        dep.nproc_per_node = len(slots.split(","))
    nproc = dep.nproc_per_node
    if not isinstance(nproc, int) or nproc < 1:
        raise ConfigError("deployment.nproc_per_node", f"must be a positive integer, got {nproc!r}")
    if not dry_run:
        if dep.accelerator == "cuda" and not hw.cuda_devices:
            raise ConfigError("deployment", f"deployment={dep.name} needs CUDA GPUs and none is visible",
                              "use deployment=cpu on this machine (or dry_run=true to plan for GPUs)")
        if dep.accelerator == "cuda" and nproc > hw.cuda_devices:
            raise ConfigError("deployment.nproc_per_node", f"{nproc} ranks need {nproc} GPUs, but {hw.cuda_devices} "
                              "are visible", f"set deployment.nproc_per_node to at most {hw.cuda_devices}, or use "
                              "deployment=cpu")
        if dep.accelerator == "cpu" and nproc > hw.cpus:
            raise ConfigError("deployment.nproc_per_node", f"{nproc} CPU ranks on {hw.cpus} cores",
                              f"set deployment.nproc_per_node to at most {hw.cpus}")
    nnodes = int(dep.get("nnodes", 1))
    if nnodes > 1 and not dep.get("rdzv_endpoint"):
        raise ConfigError("deployment.rdzv_endpoint", f"nnodes={nnodes} needs a rendezvous endpoint",
                          "set deployment.rdzv_endpoint=HOST:PORT (the same on every node)")
    if dep.threads_per_rank == "auto":
        dep.threads_per_rank = max(1, hw.cpus // nproc) if dep.accelerator == "cpu" else None
    if dep.master_port == "auto":
        dep.master_port = launch.free_port()
    return nnodes * nproc, {f"node{i}": nproc for i in range(nnodes)}


def _resolve_precision(cfg: DictConfig, hw: Hardware, accelerator: str, notes: list[str]) -> None:
    prec = cfg.precision
    if prec.dtype == "auto":
        prec.dtype = ("bf16" if hw.bf16 else "fp16") if accelerator == "cuda" else "fp32"
        notes.append(f"precision=auto chose {prec.dtype} for the {accelerator} accelerator")
    if prec.dtype not in ("fp32", "fp16", "bf16"):
        raise ConfigError("precision.dtype", f"unknown dtype {prec.dtype!r}", "use precision=fp32, fp16 or bf16")
    if prec.dtype == "bf16" and accelerator == "cuda" and hw.cuda_devices and not hw.bf16:
        raise ConfigError("precision", "bf16 is not supported by these GPUs (it needs Ampere or newer)",
                          "use precision=fp16")
    if prec.dtype == "fp16" and accelerator == "cpu":
        raise ConfigError("precision", "fp16 is not supported by DeepSpeed's CPU accelerator "
                          "(it refuses it at initialisation)", "use precision=fp32 (fastest on CPU) or precision=bf16")


def _validate_zero(zero: DictConfig, key: str = "zero") -> None:
    stage = zero.stage
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{key}.stage", f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    param = OmegaConf.select(zero, "offload_param.device", default="none")
    optim = OmegaConf.select(zero, "offload_optimizer.device", default="none")
    if param not in ("none", None) and stage != 3:
        raise ConfigError(f"{key}.offload_param", f"parameter offload needs ZeRO stage 3, but {key}.stage={stage}",
                          "use the stage3_offload option, or remove the offload_param block")
    if optim not in ("none", None) and stage == 0:
        raise ConfigError(f"{key}.offload_optimizer", f"optimizer offload needs ZeRO stage 1, 2 or 3, but "
                          f"{key}.stage=0", "use the stage2_offload or stage3_offload option")


def _resolve_optimizer(cfg: DictConfig, accelerator: str, notes: list[str]) -> None:
    opt = cfg.optimizer
    try:
        lr = float(opt.lr)
    except (TypeError, ValueError):
        raise ConfigError("optimizer.lr", f"must be a number, got {opt.lr!r}", "e.g. optimizer.lr=1e-4") from None
    if not lr > 0:
        raise ConfigError("optimizer.lr", f"the learning rate must be positive, got {opt.lr}",
                          "set a positive value, e.g. optimizer.lr=1e-4")
    offload = OmegaConf.select(cfg.zero, "offload_optimizer.device", default="none") not in ("none", None)
    if opt.impl == "auto":
        opt.impl = "deepspeed" if (accelerator == "cuda" or offload) else "torch"
        if opt.impl == "torch":
            notes.append("optimizer: torch.optim.AdamW built by the runner (on CPU, DeepSpeed's FusedAdam needs a "
                         "~45 s JIT build; optimizer.impl=deepspeed selects it)")
    if opt.impl not in ("deepspeed", "torch"):
        raise ConfigError("optimizer.impl", f"unknown value {opt.impl!r}", "use auto, deepspeed or torch")
    if opt.impl == "torch" and offload:
        raise ConfigError("optimizer.impl", "ZeRO-Offload runs the optimizer step with DeepSpeed's CPU Adam; "
                          "a torch optimizer cannot be offloaded", "use optimizer.impl=deepspeed (or auto)")


def _resolve_batch(cfg: DictConfig, world: int) -> None:
    train = cfg.train
    for key in ("micro_batch_size", "gradient_accumulation_steps"):
        value = train[key]
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"train.{key}", f"must be a positive integer, got {value!r}")
    if train.global_batch_size is not None:
        per_step = train.micro_batch_size * world
        if not isinstance(train.global_batch_size, int) or train.global_batch_size % per_step:
            raise ConfigError("train.global_batch_size", f"{train.global_batch_size} is not a multiple of "
                              f"micro_batch_size × world size = {train.micro_batch_size} × {world} = {per_step}",
                              f"use a multiple of {per_step}, or change train.micro_batch_size")
        train.gradient_accumulation_steps = train.global_batch_size // per_step
    for key in ("max_steps", "epochs"):
        value = train[key]
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"train.{key}", f"must be a positive integer or null, got {value!r}")
    if train.max_steps is None and train.epochs is None:
        raise ConfigError("train.max_steps", "neither train.max_steps nor train.epochs is set",
                          "set one of them, e.g. train.max_steps=1000")


def _validate_model(cfg: DictConfig) -> None:
    model = cfg.model
    init = cfg.step.get("init_from")
    if init:  # start from another run's export (e.g. the reward model from an SFT export)
        local = Path(os.path.expanduser(str(init)))
        if cfg.step.get("pending_exports") and not local.exists():  # an earlier stage of this pipeline writes it
            model.path = str(local.resolve())
            return
        if not (local / "config.json").is_file():
            raise ConfigError("step.init_from", f"{init!r} is not a Hugging Face model directory (no config.json)",
                              "point it at a run's export directory, e.g. outputs/sft/<run>/export")
        model.path = str(local.resolve())
        if (local / "tokenizer_config.json").is_file():
            model.tokenizer = str(local.resolve())
    if model.path is None:
        if not model.get("arch"):
            raise ConfigError("model.path", "no checkpoint path and no `arch` to build a model from",
                              "set model.path=HUB_ID_OR_DIR")
        return
    path = str(model.path)
    if is_local_path(path):
        local = Path(os.path.expanduser(path))
        if cfg.step.get("pending_exports") and not local.exists():
            return  # an earlier stage of this pipeline writes it
        if not local.is_dir():
            raise ConfigError("model.path", f"{path!r} is not a directory (nor a hub id like facebook/opt-1.3b)",
                              "point model.path at a Hugging Face model directory")
        if not (local / "config.json").is_file():
            raise ConfigError("model.path", f"{path!r} is not a Hugging Face model directory: it has no config.json",
                              "point model.path at a directory written by save_pretrained()")


def export_kind(path: Path) -> str | None:
    """What a model directory holds: runner_export.json's `kind` (causal_lm, reward_model, critic), else read from
    config.json's architectures (causal_lm / reward_model), else None."""
    info = path / "runner_export.json"
    if info.is_file():
        return json.loads(info.read_text()).get("kind")
    config = json.loads((path / "config.json").read_text())
    archs = config.get("architectures") or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return "causal_lm"
    if any(a.endswith("ForSequenceClassification") for a in archs) and config.get("num_labels", 1) == 1:
        return "reward_model"
    return None


PPO_SOURCES = {  # key -> (what it must hold, the kinds accepted, where such a directory comes from)
    "actor_from": ("a causal LM (an SFT export)", ("causal_lm",), "outputs/sft/<run>/export"),
    "critic_from": ("a reward model (a reward export)", ("reward_model", "critic"), "outputs/reward/<run>/export"),
    "reward_from": ("a reward model (a reward export)", ("reward_model",), "outputs/reward/<run>/export"),
}


def _check_source(key: str, value: str, pending: bool) -> str:
    """A PPO model source: a hub id (not checked offline) or a local model directory of the right kind."""
    what, kinds, example = PPO_SOURCES[key]
    if not is_local_path(value):
        return value
    local = Path(os.path.expanduser(value))
    if pending and not local.exists():  # an earlier stage of this pipeline writes it
        return str(local.resolve())
    if not (local / "config.json").is_file():
        raise ConfigError(f"step.{key}", f"{value!r} is not a model directory (no config.json); it must hold {what}",
                          f"point it at {example}")
    kind = export_kind(local)
    if kind not in kinds:
        raise ConfigError(f"step.{key}", f"{value!r} holds {'a ' + kind if kind else 'an unknown kind of model'}, "
                          f"but it must hold {what}", f"point it at {example}")
    return str(local.resolve())


def _positive_int(cfg: DictConfig, key: str) -> int:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(key, f"must be a positive integer, got {value!r}")
    return value


def _validate_ppo(cfg: DictConfig, notes: list[str]) -> None:
    step = cfg.step
    pending = bool(step.get("pending_exports"))
    step.actor_from = _check_source("actor_from", str(step.actor_from), pending)
    step.critic_from = _check_source("critic_from", str(step.critic_from), pending)
    if step.reward_from is None:
        step.reward_from = step.critic_from
    else:
        step.reward_from = _check_source("reward_from", str(step.reward_from), pending)
    cfg.model.path = step.actor_from
    cfg.model.tokenizer = step.actor_from
    if step.critic.get("zero") is None:
        OmegaConf.update(cfg, "step.critic.zero", OmegaConf.to_container(cfg.zero), force_add=True)
        notes.append(f"the critic uses the actor's ZeRO stage {cfg.zero.stage} (zero@step.critic.zero=... sets its own)")
    _validate_zero(cfg.step.critic.zero, "step.critic.zero")
    if step.critic.lora_r is None:
        step.critic.lora_r = cfg.lora.r
    if cfg.optimizer.impl == "torch" and OmegaConf.select(step.critic.zero, "offload_optimizer.device",
                                                          default="none") not in ("none", None):
        raise ConfigError("optimizer.impl", "the critic's ZeRO-Offload needs DeepSpeed's CPU Adam",
                          "use optimizer.impl=deepspeed")

    gen_bs = _positive_int(cfg, "step.generation_batch_size")
    batches = _positive_int(cfg, "step.generation_batches")
    _positive_int(cfg, "step.ppo_epochs")
    _positive_int(cfg, "step.max_prompt_len")
    _positive_int(cfg, "step.generation.max_new_tokens")
    micro, gas = int(cfg.train.micro_batch_size), int(cfg.train.gradient_accumulation_steps)
    experience = gen_bs * batches
    if experience % micro:
        raise ConfigError("train.micro_batch_size", f"the experience of one step ({experience} answers per rank = "
                          f"step.generation_batch_size {gen_bs} x step.generation_batches {batches}) does not split "
                          f"into training chunks of train.micro_batch_size={micro}",
                          f"use a train.micro_batch_size that divides {experience}")
    chunks = experience // micro * int(step.ppo_epochs)
    if chunks % gas:
        raise ConfigError("train.gradient_accumulation_steps", f"one PPO step has {chunks} training chunks "
                          f"(experience {experience} / micro_batch_size {micro} x ppo_epochs {step.ppo_epochs}), "
                          f"not a multiple of gradient_accumulation_steps={gas}: an optimizer step would straddle two "
                          "PPO steps", f"use a gradient_accumulation_steps that divides {chunks}")
    if step.kl.type not in ("fixed", "adaptive"):
        raise ConfigError("step.kl.type", f"unknown KL controller {step.kl.type!r}", "use fixed or adaptive")
    for key, low, high in (("step.gamma", 0, 1), ("step.lam", 0, 1), ("step.ema.beta", 0, 1)):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, (int, float)) or not low <= value <= high:
            raise ConfigError(key, f"must be a number in [{low}, {high}], got {value!r}")
    for key in ("step.kl.coef", "step.clip_reward_value", "step.cliprange", "step.cliprange_value",
                "step.value_loss_coef", "step.entropy_coef", "step.unsupervised.coef", "step.critic.lr"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(key, f"must be a non-negative number, got {value!r}")
    if step.kl.type == "adaptive" and not step.kl.target > 0:
        raise ConfigError("step.kl.target", f"must be positive for the adaptive controller, got {step.kl.target}")
    total_len = int(step.max_prompt_len) + int(step.generation.max_new_tokens)
    max_pos = None
    if is_local_path(str(step.actor_from)) and (Path(step.actor_from) / "config.json").is_file():
        max_pos = json.loads((Path(step.actor_from) / "config.json").read_text()).get("max_position_embeddings")
    max_pos = max_pos or OmegaConf.select(cfg, "model.arch.max_position_embeddings")
    if max_pos and total_len > max_pos:
        raise ConfigError("step.max_prompt_len", f"prompt ({step.max_prompt_len}) + answer "
                          f"(step.generation.max_new_tokens={step.generation.max_new_tokens}) = {total_len} tokens, "
                          f"more than the actor's {max_pos} positions",
                          f"make step.max_prompt_len + step.generation.max_new_tokens at most {max_pos}")


def check_tokenizers(cfg: DictConfig) -> None:
    """The actor's, critic's and reward model's tokenizers must be the same, or the reward model would score other
    tokens than the actor wrote."""
    from runner import modeling

    step = cfg.step
    local = [k for k in ("actor_from", "critic_from", "reward_from") if is_local_path(str(step[k]))
             and (Path(str(step[k])) / "tokenizer_config.json").is_file()]
    prints = {}
    for key in local:
        tok = modeling.load_tokenizer(OmegaConf.create({"tokenizer": str(step[key])}), key=f"step.{key}")
        prints[key] = modeling.tokenizer_fingerprint(tok)
    for key in local[1:]:
        if prints[key] != prints[local[0]]:
            raise ConfigError(f"step.{key}", f"its tokenizer ({step[key]}) differs from the one of step.{local[0]} "
                              f"({step[local[0]]}): the reward model would read other tokens than the actor writes",
                              "train the reward model with the actor's tokenizer (the same model.tokenizer in every "
                              "stage)")


def _validate_data(cfg: DictConfig) -> None:
    data = cfg.data
    if not data.sets:
        raise ConfigError("data", "no data set is chosen", "choose one or more from conf/data, e.g. data=tiny")
    split = list(data.split)
    if len(split) != 3 or any(not isinstance(x, (int, float)) or x < 0 for x in split) or sum(split) <= 0:
        raise ConfigError("data.split", f"must be three non-negative shares for sft, reward and ppo, got {split}",
                          "e.g. data.split=[2,4,4] (DeepSpeed-Chat's default) or data.split=[1,0,0]")
    stage_share = split[STAGES.get(cfg.step.name, 0)]
    if stage_share == 0 and any(not ds.sft_only for ds in data.sets.values()):
        raise ConfigError("data.split", f"gives the {cfg.step.name} stage no rows ({split})",
                          "give this stage a positive share")
    for key, allowed in (("overlong", ("truncate", "drop")), ("bad_rows", ("error", "skip"))):
        if data[key] not in allowed:
            raise ConfigError(f"data.{key}", f"unknown value {data[key]!r}", f"use {' or '.join(allowed)}")
    max_pos = OmegaConf.select(cfg, "model.arch.max_position_embeddings")
    if data.max_seq_len == "auto":
        data.max_seq_len = min(512, max_pos or 512)
    if not isinstance(data.max_seq_len, int) or data.max_seq_len < 2:
        raise ConfigError("data.max_seq_len", f"must be an integer of at least 2 (or auto), got {data.max_seq_len!r}")
    if max_pos and data.max_seq_len > max_pos:
        raise ConfigError("data.max_seq_len", f"{data.max_seq_len} is longer than the model's "
                          f"{max_pos} positions (model.arch.max_position_embeddings)",
                          f"set data.max_seq_len to at most {max_pos}")
    for name, ds in data.sets.items():
        key = f"data.sets.{name}"
        path = str(ds.path)
        if is_local_path(path):
            local = Path(os.path.expanduser(path))
            if not local.exists():
                raise ConfigError(f"{key}.path", f"{path!r} does not exist",
                                  "give a json/jsonl/csv/parquet file, a directory of split files, or a hub id")
            if local.is_file() and not os.access(local, os.R_OK):
                raise ConfigError(f"{key}.path", f"{path!r} is not readable", "check the file's permissions")
        if ds.format not in ("pairs", "scored", "embedded"):
            raise ConfigError(f"{key}.format", f"unknown format {ds.format!r}", "use pairs, scored or embedded")
        if not isinstance(ds.weight, (int, float)) or ds.weight <= 0:
            raise ConfigError(f"{key}.weight", f"must be a positive number, got {ds.weight!r}")
        if "{prompt}" not in str(ds.template):
            raise ConfigError(f"{key}.template", f"{ds.template!r} has no {{prompt}} placeholder",
                              "e.g. '\\n\\nHuman: {prompt}\\n\\nAssistant:'")


def make_plan(cfg: DictConfig, hw: Hardware | None = None) -> Plan:
    """Resolve and validate a composed config. Raises ConfigError on bad input."""
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
    hw = hw or Hardware.detect()
    notes: list[str] = []
    dry_run = bool(cfg.dry_run)
    world, nodes = _resolve_deployment(cfg, hw, dry_run, notes)
    _resolve_precision(cfg, hw, cfg.deployment.accelerator, notes)
    _validate_zero(cfg.zero)
    _resolve_optimizer(cfg, cfg.deployment.accelerator, notes)
    _resolve_batch(cfg, world)
    if cfg.step.name == "ppo":
        _validate_ppo(cfg, notes)
    _validate_model(cfg)
    _validate_data(cfg)
    lora = cfg.lora
    if not isinstance(lora.r, int) or lora.r < 0:
        raise ConfigError("lora.r", f"must be a non-negative integer (0 = off), got {lora.r!r}")
    if cfg.logger.name == "wandb" and cfg.logger.mode not in ("auto", "online", "offline"):
        raise ConfigError("logger.mode", f"unknown wandb mode {cfg.logger.mode!r}", "use auto, online or offline")
    return Plan(cfg=cfg, world_size=world, nodes=nodes, notes=notes)
