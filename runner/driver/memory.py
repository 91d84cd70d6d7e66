"""Model-state memory per device before launch: DeepSpeed's own estimators for ZeRO-2/3 (their formulas, here so
that planning imports no DeepSpeed; tests/test_config.py checks them against DeepSpeed's functions) and the ZeRO
paper's accounting for stages 0 and 1. Works offline: it needs only the parameter counts the model presets carry."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

GB = 1024**3


def model_state_memory(cfg: DictConfig, num_params: int, largest_layer: int, gpus_per_node: int, nodes: int) -> dict:
    """Bytes per device and per node's CPU for the model states (params, grads, optimizer) of the run's trained model
    under cfg.zero and cfg.precision (see trained_states)."""
    dtype = str(cfg.precision.dtype)
    ds = {
        "zero_optimization": OmegaConf.to_container(cfg.zero, resolve=True),
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16"},
    }
    torch_opt = OmegaConf.select(cfg, "optimizer.impl") == "torch"
    cpu, dev, how = trained_states(ds, num_params, num_params, largest_layer, gpus_per_node, nodes, torch_opt)
    return {
        "per_device_gb": dev / GB,
        "per_node_cpu_gb": cpu / GB,
        "num_params": num_params,
        "devices": gpus_per_node * nodes,
        "source": how,
    }


def zero3_model_states(
    params: int,
    largest: int,
    gpus_per_node: int,
    nodes: int,
    offload_optimizer: bool,
    offload_params: bool,
    buffer: float = 1.5,
) -> tuple[int, int]:
    """(CPU bytes per node, bytes per device): deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs
    with zero_init=True."""
    gpus, per_node = nodes * gpus_per_node, 1 / nodes
    largest_bytes = 4 * largest
    if offload_optimizer and offload_params:
        return int(params * 18 * per_node * buffer), int(largest_bytes)
    if offload_optimizer:
        return int(params * 16 * per_node * buffer), int(largest_bytes + int(2 * params / gpus))
    return int(largest * 4 * gpus_per_node * buffer), int(largest_bytes + int(18 * params / gpus))


def zero2_model_states(
    params: int, gpus_per_node: int, nodes: int, offload_optimizer: bool, buffer: float = 1.5
) -> tuple[int, int]:
    """(CPU bytes per node, bytes per device): DeepSpeed's
    deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs."""
    gpus = nodes * gpus_per_node
    if offload_optimizer:
        return int(params * max(4 * gpus, 16) * buffer), int(2 * params)
    return int(params * 4 * gpus_per_node * buffer), int(2 * params + int(18 * params / gpus))


def frozen_model_memory(params: int, largest: int, ds: dict, gpus_per_node: int, nodes: int) -> tuple[int, int]:
    """(CPU bytes per node, bytes per device) of a frozen engine (a reference, a reward model): its weights only, in
    the engine's dtype. ZeRO-3 partitions them over every device and gathers one layer at a time; offloaded, the
    partitions live in the node's CPU memory."""
    width = 2 if any(ds.get(k, {}).get("enabled") for k in ("bf16", "fp16")) else 4
    zero = ds.get("zero_optimization", {})
    gpus = gpus_per_node * nodes
    if zero.get("stage") != 3:
        return 0, width * params
    if (zero.get("offload_param") or {}).get("device", "none") != "none":
        return int(width * params / nodes), width * largest
    return 0, int(width * params / gpus) + width * largest


OPTIMIZER_BYTES = {"adamw": 8, "adam": 8, "lamb": 8, "lion": 4, "adagrad": 4, "muon": 4, "sgd": 4}


def lora_params(arch: dict, r: int) -> int:
    """Trainable parameters of LoRA adapters of rank r on every linear layer of the blocks (lora.target_modules=auto):
    r x (inputs + outputs) per linear."""
    from runner.driver.estimate import Arch

    a = Arch.of(arch)
    kv = a.hidden * a.kv_heads // a.heads
    attention = 2 * (a.hidden + a.hidden) + 2 * (a.hidden + kv)  # q, o; k, v
    mlp = (3 if a.gated else 2) * (a.hidden + a.ffn)
    return a.layers * r * (attention + mlp)


def trained_states(
    ds: dict,
    params: int,
    trainable: int,
    largest: int,
    gpus_per_node: int,
    nodes: int,
    torch_optimizer: bool,
    optimizer: str = "adamw",
) -> tuple[int, int, str]:
    """(CPU bytes per node, bytes per device, how it was counted) of a trained engine's model states, from its
    DeepSpeed JSON.

    Mixed precision at ZeRO-2/3 with every parameter trained is DeepSpeed's own estimator. Otherwise the same
    accounting term by term: weights in the engine's dtype (partitioned at ZeRO-3), gradients in that dtype
    (partitioned from ZeRO-2), and the optimizer's fp32 partition: its moments plus, from ZeRO-1 or in mixed
    precision, an fp32 master copy and fp32 gradients (partitioned from ZeRO-1). (torch's AdamW allocates one more
    fp32 buffer of its partition during its step, when the activations are gone: step_buffer.)"""
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    mixed = any(ds.get(k, {}).get("enabled") for k in ("bf16", "fp16"))
    off_opt = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    off_param = (zero.get("offload_param") or {}).get("device", "none") not in ("none", None)
    gpus = gpus_per_node * nodes
    k = OPTIMIZER_BYTES.get(optimizer.lower(), 8)
    if mixed and trainable == params and k == 8 and not torch_optimizer:
        if stage == 3:
            cpu, dev = zero3_model_states(params, largest, gpus_per_node, nodes, off_opt, off_param)
            return cpu, dev, "DeepSpeed's estimate_zero3_model_states_mem_needs"
        if stage == 2 or (stage == 1 and off_opt):
            cpu, dev = zero2_model_states(params, gpus_per_node, nodes, off_opt)
            return cpu, dev, "DeepSpeed's estimate_zero2_model_states_mem_needs"
    w = 2 if mixed else 4
    weights = w * params / (gpus if stage == 3 else 1) + (4 * largest if stage == 3 else 0)
    grads = w * trainable / (gpus if stage >= 2 else 1)
    per_opt = k + (8 if (stage >= 1 or mixed) else 0)
    optim = per_opt * trainable / (gpus if stage >= 1 else 1)
    cpu = 0.0
    if off_opt:
        cpu, optim = optim * gpus_per_node, 0.0
    if off_param and stage == 3:
        cpu, weights = cpu + w * params / nodes, 4 * largest
    how = "ZeRO paper accounting per term" + (f" ({trainable:,} LoRA parameters trained)" if trainable < params else "")
    return int(cpu), int(weights + grads + optim), how


def step_buffer(ds: dict, trainable: int, gpus: int, unfused_torch: bool) -> int:
    """Bytes per device torch's for-loop/foreach AdamW (`unfused_torch`: optimizer.impl=torch, optimizer.fused=false)
    allocates during its step (one fp32 tensor per parameter of its partition); torch's fused kernel and DeepSpeed's
    fused and CPU optimizers allocate none."""
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    return int(4 * trainable / (gpus if stage >= 1 else 1)) if unfused_torch else 0


def run_memory(cfg: DictConfig, configs: dict, sizes: dict, gpus_per_node: int, nodes: int) -> dict:
    """The model states of every engine of a run, per device and per node's CPU: trained engines (those with an
    optimizer) by trained_states with their own DeepSpeed JSON, frozen ones by frozen_model_memory. `sizes` maps an
    engine's name to (parameters, largest layer's parameters); "" is the trained model."""
    torch_opt = OmegaConf.select(cfg, "optimizer.impl") == "torch"
    opt_name = str(OmegaConf.select(cfg, "optimizer.name") or "adamw")
    engines, sources = {}, set()
    for name, ds in configs.items():
        n, big = sizes.get(name) or sizes[""]
        if not name or "optimizer" in ds or "scheduler" in ds:  # (a torch optimizer is not in the JSON)
            r = _lora_rank(cfg, name)
            arch = OmegaConf.to_container(cfg.model.arch, resolve=True) if cfg.model.get("arch") else {}
            trainable = min(n, lora_params(arch, r)) if r and arch and _lora_only(cfg) else n
            cpu, dev, how = trained_states(ds, n, trainable, big, gpus_per_node, nodes, torch_opt, opt_name)
            sources.add(how)
            unfused = torch_opt and OmegaConf.select(cfg, "optimizer.fused") is False
            trained, buffer = True, step_buffer(ds, trainable, gpus_per_node * nodes, unfused)
        else:
            cpu, dev = frozen_model_memory(n, big, ds, gpus_per_node, nodes)
            trained, buffer = False, 0
        engines[name] = {
            "per_device_gb": dev / GB,
            "per_node_cpu_gb": cpu / GB,
            "num_params": n,
            "trained": trained,
            "step_buffer_gb": buffer / GB,
        }
    return {
        "per_device_gb": sum(e["per_device_gb"] for e in engines.values()),
        "per_node_cpu_gb": sum(e["per_node_cpu_gb"] for e in engines.values()),
        "num_params": sizes[""][0],
        "devices": gpus_per_node * nodes,
        "source": "; ".join(sorted(sources)),
        "engines": engines,
    }


def _lora_rank(cfg: DictConfig, name: str) -> int:
    """The LoRA rank of a trained engine: lora.r for the run's model, step.actor/critic.lora_r for PPO's."""
    role = {"": "actor", "critic": "critic"}.get(name)
    own = OmegaConf.select(cfg, f"step.{role}.lora_r") if role else None
    return int(own if own is not None else (cfg.lora.r if not name else 0) or 0)


def _lora_only(cfg: DictConfig) -> bool:
    return bool(OmegaConf.select(cfg, "lora.only_optimize", default=True))
