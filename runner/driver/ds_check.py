"""Every engine's DeepSpeed JSON checked in the driver, before anything is written: the runner's rules always (they
cost no import), DeepSpeed's own config classes when raw keys were added (`+ds.*`, `+zero.*`: the escape hatch
bypasses every other check). A key DeepSpeed would ignore is an error too, never a silent no-op."""

from __future__ import annotations

import copy
import difflib

from omegaconf import DictConfig

from runner.errors import ConfigError

# DeepSpeed's top-level configuration keys (DeepSpeed 0.19's documented JSON, plus the string constants its config
# module reads, added at check time): any other key is one DeepSpeed never reads.
TOP_LEVEL = {
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "optimizer",
    "scheduler",
    "fp16",
    "bf16",
    "bfloat16",
    "amp",
    "torch_autocast",
    "gradient_clipping",
    "prescale_gradients",
    "gradient_predivide_factor",
    "sparse_gradients",
    "communication_data_type",
    "seq_parallel_communication_data_type",
    "zero_optimization",
    "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer",
    "steps_per_print",
    "wall_clock_breakdown",
    "dump_state",
    "memory_breakdown",
    "flops_profiler",
    "activation_checkpointing",
    "aio",
    "autotuning",
    "checkpoint",
    "data_efficiency",
    "data_types",
    "elasticity",
    "hybrid_engine",
    "tensorboard",
    "wandb",
    "csv_monitor",
    "comet",
    "comms_logger",
    "compile",
    "curriculum_learning",
    "dataloader_drop_last",
    "eigenvalue",
    "progressive_layer_drop",
    "nebula",
    "pipeline",
    "tensor_parallel",
    "sequence_parallel_size",
    "weight_quantization",
    "timers",
    "use_data_before_expert_parallelism",
    "disable_allgather",
    "graph_harvesting",
    "deepcompile",
    "compression_training",
    "sparse_attention",
    "gradient_allreduce_op",
}
STAGE3_ONLY = (
    "offload_param",
    "stage3_",
    "zero_hpz_partition_size",
    "zero_quantized_weights",
    "zero_quantized_nontrainable_weights",
    "mics_",
)


def _where(name: str) -> str:
    return f"ds_config.{name}.json" if name else "ds_config.json"


def removed(ds: dict, name: str) -> None:
    """A removed compressed-communication feature asked for through +ds.*: named, with ZeRO++ as the alternative
    (DeepSpeed 0.19.8 refuses compression_training itself, and would fail on a 1-bit optimizer only at start-up)."""
    from runner.driver.optimizers import REMOVED_FIX, removed_message

    if "compression_training" in ds:
        raise ConfigError(
            "ds.compression_training",
            f"DeepSpeed's compression library was removed ({_where(name)}; DeepSpeed 0.19.8 refuses the block: "
            "'A leftover compression_training block would be ignored and the model would train unquantized')",
            "remove it; " + REMOVED_FIX,
        )
    kind = (ds.get("optimizer") or {}).get("type")
    message = removed_message(kind) if kind else None
    if message:
        raise ConfigError("ds.optimizer.type", message, REMOVED_FIX)


def rules(configs: dict[str, dict], accelerator: str) -> None:
    """The runner's checks of every final JSON (fp16 with bf16, fp16 on the CPU accelerator, keys the chosen ZeRO
    stage ignores)."""
    for name, ds in configs.items():
        removed(ds, name)
        fp16, bf16 = (ds.get("fp16") or {}).get("enabled"), (ds.get("bf16") or ds.get("bfloat16") or {}).get("enabled")
        if fp16 and bf16:
            raise ConfigError(
                "ds",
                f"{_where(name)} enables both fp16 and bf16",
                "choose one: precision=fp16 or precision=bf16 (and drop the +ds.fp16 / +ds.bf16 keys)",
            )
        if fp16 and accelerator == "cpu":
            raise ConfigError(
                "ds.fp16",
                "fp16 is not supported by DeepSpeed's CPU accelerator (it refuses it at initialisation)",
                "use precision=fp32 (fastest on CPU) or precision=bf16",
            )
        zero = ds.get("zero_optimization") or {}
        stage = zero.get("stage", 0)
        if stage != 3:
            ignored = sorted(
                k
                for k in zero
                if k.startswith(STAGE3_ONLY)
                and not (k == "offload_param" and (zero[k] or {}).get("device", "none") == "none")
            )
            if ignored:
                raise ConfigError(
                    f"zero.{ignored[0]}",
                    f"is a ZeRO-3 setting, and {_where(name)} uses stage {stage}: DeepSpeed would ignore it",
                    "use zero=stage3 (or stage3_offload), or remove the key",
                )
        if stage == 0 and (zero.get("offload_optimizer") or {}).get("device", "none") != "none":
            raise ConfigError(
                "zero.offload_optimizer",
                "needs ZeRO stage 1, 2 or 3; DeepSpeed ignores it at stage 0",
                "use zero=stage2_offload or zero=stage3_offload",
            )


def deepspeed_parse(configs: dict[str, dict]) -> None:
    """DeepSpeed's own parser on every JSON (its batch arithmetic is checked at world size 1: the runner derived
    train_batch_size itself), and no top-level key it would never read."""
    import deepspeed.runtime.constants as constants
    from deepspeed.runtime.config import DeepSpeedConfig

    known = TOP_LEVEL | {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)}
    for name, ds in configs.items():
        for key in ds:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(TOP_LEVEL), n=1)
                raise ConfigError(
                    f"ds.{key}",
                    f"is not a DeepSpeed configuration key ({_where(name)}): DeepSpeed would ignore it",
                    f"did you mean ds.{close[0]}?" if close else "see DeepSpeed's configuration JSON documentation",
                )
        probe = copy.deepcopy(ds)
        probe["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]
        try:
            DeepSpeedConfig(probe)
        except Exception as exc:  # pydantic ValidationError, DeepSpeedConfigError, AssertionError, ValueError
            text = " ".join(str(exc).split())[:400] or type(exc).__name__
            raise ConfigError(
                "ds", f"DeepSpeed rejects {_where(name)}: {text}", "fix or remove the +ds.* / +zero.* key it names"
            ) from None


def check(cfg: DictConfig, configs: dict[str, dict], raw_keys: bool) -> None:
    rules(configs, cfg.deployment.accelerator)
    if raw_keys:
        deepspeed_parse(configs)
