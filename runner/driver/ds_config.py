"""The DeepSpeed JSON, built by one pure function from the resolved config.

Every key traces to its source in one hop:

    train_batch_size                 = train.micro_batch_size × train.gradient_accumulation_steps × parallel.data
                                       (parallel.data = world_size / (parallel.tensor × parallel.sequence))
    tensor_parallel.autotp_size      = parallel.tensor     (only when > 1: AutoTP shards the model at initialize)
    sequence_parallel_size           = parallel.sequence   (only when > 1: Ulysses; the ranks pass its mpu)
    train_micro_batch_size_per_gpu   = train.micro_batch_size
    gradient_accumulation_steps      = train.gradient_accumulation_steps
    gradient_clipping                = train.gradient_clipping
    steps_per_print                  = train.steps_per_print
    wall_clock_breakdown             = train.wall_clock_breakdown
    zero_optimization                = zero.*              (DeepSpeed's own key names, copied as they are)
    fp16 / bf16                      = precision.*
    optimizer                        = optimizer.*         (only when optimizer.impl == deepspeed; its keys:
                                                            runner.driver.optimizers.PARAMS)
    scheduler                        = scheduler.* and the run's total optimizer steps
    (no tensorboard / wandb / csv_monitor blocks: the runner logs to the trackers itself, on the optimizer-step
     axis; DeepSpeed's monitor would add its learning rate on a sample-count axis: runner.train.trackers)
    anything else                    = ds.*                (the escape hatch, merged last)
"""

from __future__ import annotations

import copy
from typing import Any

from omegaconf import DictConfig, OmegaConf

from runner.driver import optimizers

SCHEDULERS = {"cosine": "WarmupCosineLR", "linear": "WarmupDecayLR", "constant": "WarmupLR"}


def warmup_steps(scheduler: DictConfig, total_steps: int) -> int:
    if scheduler.warmup_steps:
        return int(scheduler.warmup_steps)
    return int(round(float(scheduler.warmup_ratio) * total_steps))


def _deep_merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def _batch(parallel: DictConfig, per_rank: int, world_size: int) -> dict[str, Any]:
    """train_batch_size (the global batch: micro-batch x accumulation x data-parallel ranks) and the parallel blocks.
    DeepSpeed divides the world by the model-parallel degree itself: by sequence_parallel_size, and under AutoTP by
    the tensor-parallel groups the ranks hand it (runner.train.parallel.prepare)."""
    tensor, sequence = int(parallel.tensor), int(parallel.sequence)
    out: dict[str, Any] = {"train_batch_size": per_rank * (world_size // (tensor * sequence))}
    if tensor > 1:
        out["tensor_parallel"] = {"autotp_size": tensor}
    if sequence > 1:
        out["sequence_parallel_size"] = sequence
    return out


def build_ds_config(cfg: DictConfig, world_size: int, total_steps: int, run_dir: str) -> dict[str, Any]:
    """The complete DeepSpeed config for the training engine of a resolved run config.

    `cfg` must be resolved (no `auto` left in precision, optimizer.impl or gradient_accumulation_steps):
    runner.plan does that before calling this.
    """
    train = cfg.train
    micro, gas = int(train.micro_batch_size), int(train.gradient_accumulation_steps)
    ds: dict[str, Any] = {
        **_batch(cfg.parallel, micro * gas, world_size),
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": float(train.gradient_clipping),
        "steps_per_print": int(train.steps_per_print),
        "wall_clock_breakdown": bool(train.wall_clock_breakdown),
        "zero_optimization": OmegaConf.to_container(cfg.zero, resolve=True),
    }

    precision = cfg.precision
    if precision.dtype == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "auto_cast": False,
            "loss_scale": precision.loss_scale,
            "initial_scale_power": precision.initial_scale_power,
            "loss_scale_window": precision.loss_scale_window,
            "hysteresis": precision.hysteresis,
            "min_loss_scale": precision.min_loss_scale,
        }
    elif precision.dtype == "bf16":
        ds["bf16"] = {"enabled": True}
    else:  # fp32
        ds["fp16"] = {"enabled": False}
        ds["bf16"] = {"enabled": False}

    opt = cfg.optimizer
    if opt.impl == "deepspeed":
        ds["optimizer"] = optimizers.ds_block(opt)

    sched = cfg.scheduler
    warmup = warmup_steps(sched, total_steps)
    lr = float(opt.lr)
    if sched.name == "cosine":
        # DeepSpeed needs warmup_num_steps >= 1; with no warmup a min ratio of 1 makes that step run at full lr.
        params = {
            "total_num_steps": total_steps,
            "warmup_num_steps": max(1, warmup),
            "warmup_min_ratio": 0.0 if warmup else 1.0,
            "cos_min_ratio": float(sched.min_lr_ratio),
            "warmup_type": "linear",
        }
    elif sched.name == "linear":
        # WarmupDecayLR decays to warmup_min_lr, so it must be 0 (with no warmup DeepSpeed still ramps 2 steps)
        params = {
            "total_num_steps": total_steps,
            "warmup_min_lr": 0.0,
            "warmup_max_lr": lr,
            "warmup_num_steps": max(1, warmup),
            "warmup_type": "linear",
        }
    else:
        params = {
            "warmup_min_lr": 0.0 if warmup else lr,
            "warmup_max_lr": lr,
            "warmup_num_steps": max(1, warmup),
            "warmup_type": "linear",
        }
    ds["scheduler"] = {"type": SCHEDULERS[sched.name], "params": params}

    extra = OmegaConf.to_container(cfg.ds, resolve=True) if cfg.get("ds") else {}
    return _deep_merge(ds, copy.deepcopy(extra))


FETCH_KEYS = (  # how a ZeRO-3 engine fetches its partitioned parameters: frozen engines follow the `zero` group
    "stage3_param_persistence_threshold",
    "stage3_prefetch_bucket_size",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
)


def inference_config(cfg: DictConfig, world_size: int, micro: int, stage: int, offload: bool) -> dict[str, Any]:
    """A frozen model's engine (a reference, a reward model): no optimizer, no scheduler; ZeRO-3 partitions it where
    the engine it mirrors is ZeRO-3, and its weights live on the CPU when offloaded (which needs ZeRO-3). Partitioned,
    it fetches its parameters as the `zero` group says (FETCH_KEYS; DeepSpeed's defaults otherwise): DeepSpeed-Chat's
    frozen engines partitioned every tensor above 1e4 elements, and gathering them again for every forward pass was
    most of the tiny recipe's 2-rank reference forward."""
    zero: dict[str, Any] = {"stage": 3 if (stage == 3 or offload) else 0}
    if zero["stage"] == 3:
        if int(cfg.zero.stage) == 3:
            zero.update({k: cfg.zero[k] for k in FETCH_KEYS if cfg.zero.get(k) is not None})
        if offload:
            zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.deployment.accelerator == "cuda"}
    ds: dict[str, Any] = {
        "train_batch_size": micro * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "steps_per_print": int(cfg.train.steps_per_print),
        "wall_clock_breakdown": False,
        "zero_optimization": zero,
    }
    dtype = cfg.precision.dtype
    ds["fp16"] = {"enabled": dtype == "fp16"}
    ds["bf16"] = {"enabled": dtype == "bf16"}
    return ds


def judge_configs(cfg: DictConfig, world_size: int, micro: int) -> dict[str, dict[str, Any]]:
    """A frozen engine for every reward-model term of the `reward` group: ds_config.judge<i>.json (ZeRO-3 when the
    trained model is)."""
    terms = OmegaConf.select(cfg, "reward.terms") or []
    return {
        f"judge{i}": inference_config(cfg, world_size, micro, int(cfg.zero.stage), False)
        for i, term in enumerate(terms)
        if term.get("model")
    }
