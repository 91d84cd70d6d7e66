"""Planning a run: resolve every `auto` against the hardware, validate, and derive world size, batch and launcher.

Nothing here writes a file or starts a process; the driver (runner.__main__) does that once the plan is valid.
"""
from __future__ import annotations

import dataclasses
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


def _validate_zero(cfg: DictConfig) -> None:
    zero = cfg.zero
    stage = zero.stage
    if stage not in (0, 1, 2, 3):
        raise ConfigError("zero.stage", f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    param = OmegaConf.select(zero, "offload_param.device", default="none")
    optim = OmegaConf.select(zero, "offload_optimizer.device", default="none")
    if param not in ("none", None) and stage != 3:
        raise ConfigError("zero.offload_param", f"parameter offload needs ZeRO stage 3, but zero.stage={stage}",
                          "use zero=stage3_offload, or remove the offload_param block")
    if optim not in ("none", None) and stage == 0:
        raise ConfigError("zero.offload_optimizer", "optimizer offload needs ZeRO stage 1, 2 or 3, but zero.stage=0",
                          "use zero=stage2_offload or zero=stage3_offload")


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
        if not local.is_dir():
            raise ConfigError("model.path", f"{path!r} is not a directory (nor a hub id like facebook/opt-1.3b)",
                              "point model.path at a Hugging Face model directory")
        if not (local / "config.json").is_file():
            raise ConfigError("model.path", f"{path!r} is not a Hugging Face model directory: it has no config.json",
                              "point model.path at a directory written by save_pretrained()")


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
    _validate_zero(cfg)
    _resolve_optimizer(cfg, cfg.deployment.accelerator, notes)
    _resolve_batch(cfg, world)
    _validate_model(cfg)
    _validate_data(cfg)
    if cfg.logger.name == "wandb" and cfg.logger.mode not in ("auto", "online", "offline"):
        raise ConfigError("logger.mode", f"unknown wandb mode {cfg.logger.mode!r}", "use auto, online or offline")
    return Plan(cfg=cfg, world_size=world, nodes=nodes, notes=notes)
