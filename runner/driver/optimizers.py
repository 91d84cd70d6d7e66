"""The `optimizer` group: which implementation runs each optimizer on this accelerator, and its DeepSpeed JSON block.

DeepSpeed 0.19.8 builds, for an optimizer block (runtime/engine.py _configure_basic_optimizer):

    AdamW    FusedAdam (GPU; a ~45 s JIT build on CPU), DeepSpeedCPUAdam under ZeRO-Offload
    Adagrad  torch.optim.Adagrad, DeepSpeedCPUAdagrad under ZeRO-Offload
    Lion     FusedLion (CUDA kernels only), DeepSpeedCPULion under ZeRO-Offload
    LAMB     FusedLamb (CUDA kernels only, also under ZeRO-Offload)
    Muon     MuonWithAuxAdam: Muon on the 2-D weights, Adam on the rest (embeddings, head, norms, biases)

`optimizer.impl=torch` builds the torch class of the same name in the runner (runner.train.engine) where torch has
one that takes the same settings: AdamW and Adagrad.
"""

from __future__ import annotations

from omegaconf import DictConfig

from runner.driver import checks
from runner.errors import ConfigError

# name -> the optimizer's own keys copied into the JSON's params (lr and weight_decay always are)
PARAMS = {
    "AdamW": ("betas", "eps"),
    "Adagrad": ("eps",),
    "Lion": ("betas",),
    "LAMB": ("betas", "eps", "max_coeff", "min_coeff"),
    "Muon": ("momentum", "betas", "eps", "muon_lr", "adam_lr"),
}
TORCH = ("AdamW", "Adagrad")  # torch.optim has them with these settings
CPU_OFFLOAD = ("AdamW", "Adagrad", "Lion")  # DeepSpeed has a CPU optimizer for ZeRO-Offload
REMOVED = {  # lower-cased spellings -> what DeepSpeed removed
    "onebitadam": "1-bit Adam",
    "onebit_adam": "1-bit Adam",
    "zerooneadam": "0/1 Adam",
    "zero_one_adam": "0/1 Adam",
    "onebitlamb": "1-bit LAMB",
    "onebit_lamb": "1-bit LAMB",
}
REMOVED_FIX = (
    "use ZeRO++ for compressed communication: zero=stage3_zeropp (qwZ quantized weights, qgZ quantized gradients, "
    "hpZ hierarchical partitioning), with optimizer=adamw or another optimizer of conf/optimizer"
)


def removed_message(name: str) -> str | None:
    """The refusal for a 1-bit optimizer DeepSpeed removed, or None for any other name."""
    what = REMOVED.get(str(name).lower().replace("-", "_"))
    if what is None:
        return None
    return (
        f"{what} was removed from DeepSpeed (with its compressed-communication backends; DeepSpeed 0.19.8 has no "
        f"{name!r} optimizer, see https://github.com/deepspeedai/DeepSpeed/issues/8489)"
    )


def resolve(cfg: DictConfig, accelerator: str, offload: bool, notes: list[str]) -> None:
    """optimizer.impl: auto -> deepspeed or torch; refuses what cannot run here, naming why."""
    opt = cfg.optimizer
    removed = removed_message(opt.name)
    if removed:
        raise ConfigError("optimizer", removed, REMOVED_FIX)
    if opt.name not in PARAMS:
        raise ConfigError(
            "optimizer.name", f"unknown optimizer {opt.name!r}", f"choose one of conf/optimizer: {', '.join(PARAMS)}"
        )
    try:
        float(opt.lr)
    except (TypeError, ValueError):
        raise ConfigError("optimizer.lr", f"must be a number, got {opt.lr!r}", "e.g. optimizer.lr=1e-4") from None
    checks.positive(cfg, "optimizer.lr", example="1e-4")
    checks.non_negative(cfg, "optimizer.weight_decay")
    if opt.impl == "auto":
        opt.impl = "deepspeed" if (accelerator == "cuda" or offload or opt.name not in TORCH) else "torch"
        if opt.impl == "torch":
            notes.append(
                f"optimizer: torch.optim.{opt.name} built by the runner (on CPU, DeepSpeed's "
                + ("FusedAdam needs a ~45 s JIT build" if opt.name == "AdamW" else "Adagrad is torch's too")
                + "; optimizer.impl=deepspeed selects it)"
            )
    if opt.impl not in ("deepspeed", "torch"):
        raise ConfigError("optimizer.impl", f"unknown value {opt.impl!r}", "use auto, deepspeed or torch")
    if opt.impl == "torch" and opt.name not in TORCH:
        raise ConfigError(
            "optimizer.impl",
            f"torch.optim has no {opt.name} that takes these settings"
            + (
                " (torch.optim.Muon takes only 2-D parameters; DeepSpeed pairs it with Adam)"
                if opt.name == "Muon"
                else ""
            ),
            "use optimizer.impl=deepspeed (or auto)",
        )
    if opt.impl == "deepspeed" and opt.get("fused") is False:
        raise ConfigError(
            "optimizer.fused",
            "false applies to optimizer.impl=torch only; DeepSpeed chooses its own kernel (FusedAdam on GPU, its CPU "
            "optimizers under offload)",
            "drop optimizer.fused=false, or set optimizer.impl=torch to train with torch's for-loop optimizer",
        )
    if opt.impl == "torch" and offload:
        raise ConfigError(
            "optimizer.impl",
            "ZeRO-Offload runs the optimizer step with a DeepSpeed CPU optimizer; a torch one cannot be offloaded",
            "use optimizer.impl=deepspeed (or auto)",
        )
    if offload and opt.name not in CPU_OFFLOAD:
        raise ConfigError(
            "optimizer.name",
            f"ZeRO-Offload runs the optimizer step on the CPU, and DeepSpeed has no CPU {opt.name} "
            f"(its CPU optimizers: {', '.join(CPU_OFFLOAD)})",
            "use a zero option without offload, or optimizer=adamw / adagrad / lion",
        )
    if opt.name == "Adagrad" and not offload and cfg.zero.stage in (1, 2):
        raise ConfigError(
            "optimizer",
            f"Adagrad at ZeRO stage {cfg.zero.stage} fails in DeepSpeed 0.19.8's first step (IndexError in "
            "stage_1_and_2._get_flat_partition_unpadded: the flat partition of torch's Adagrad has no parameters; "
            "seen on 2 CPU ranks, and the code is the same on GPUs)",
            "use Adagrad at zero=stage0 or stage3, or under offload (zero=stage2_offload: DeepSpeedCPUAdagrad)",
        )
    if accelerator == "cpu" and opt.impl == "deepspeed" and not offload and opt.name in ("Lion", "LAMB"):
        raise ConfigError(
            "optimizer",
            f"DeepSpeed's {opt.name} is Fused{opt.name.capitalize() if opt.name == 'Lion' else 'Lamb'}, built only "
            "from CUDA kernels; the CPU accelerator refuses it ('This op had not been implemented on CPU backend.')"
            + (" and torch has no Lion" if opt.name == "Lion" else " and torch has no LAMB"),
            "on this CPU use optimizer=lion with zero=stage2_offload or stage3_offload (DeepSpeedCPULion), or "
            "optimizer=adamw / adagrad / muon"
            if opt.name == "Lion"
            else "use optimizer=adamw, adagrad or muon on CPU; LAMB runs on GPUs",
        )


def ds_block(opt: DictConfig) -> dict:
    """The JSON's optimizer block: type and params (keys left null are DeepSpeed's defaults, not written)."""
    params = {"lr": float(opt.lr), "weight_decay": float(opt.weight_decay)}
    for key in PARAMS[opt.name]:
        value = opt.get(key)
        if value is not None:
            params[key] = list(value) if key == "betas" else float(value)
    return {"type": opt.name, "params": params}
