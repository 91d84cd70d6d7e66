"""Model-state memory per device before launch: DeepSpeed's own estimators for ZeRO-2/3 (their formulas, here so
that planning imports no DeepSpeed; tests/test_config.py checks them against DeepSpeed's functions) and the ZeRO
paper's accounting for stages 0 and 1. Works offline: it needs only the parameter counts the model presets carry."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

GB = 1024**3


def model_state_memory(cfg: DictConfig, num_params: int, largest_layer: int, gpus_per_node: int, nodes: int) -> dict:
    """Bytes per device and per node's CPU for the model states (params, grads, optimizer) of the training engine.

    DeepSpeed's estimators assume mixed precision with Adam: 2 bytes of 16-bit parameters plus 18 bytes per parameter of
    16/32-bit gradients, fp32 master weights and two Adam moments, divided by the ZeRO stage's partitioning.
    """
    stage = int(cfg.zero.stage)
    offload_opt = OmegaConf.select(cfg.zero, "offload_optimizer.device", default="none") not in ("none", None)
    offload_param = OmegaConf.select(cfg.zero, "offload_param.device", default="none") not in ("none", None)
    total = gpus_per_node * nodes
    if stage == 3:
        cpu, dev = zero3_model_states(num_params, largest_layer, gpus_per_node, nodes, offload_opt, offload_param)
        source = "DeepSpeed's estimate_zero3_model_states_mem_needs"
    elif stage == 2 or (stage == 1 and offload_opt):
        cpu, dev = zero2_model_states(num_params, gpus_per_node, nodes, offload_opt)
        source = "DeepSpeed's estimate_zero2_model_states_mem_needs"
    elif stage == 1:  # optimizer state (fp32 master + 2 moments = 12 B/param) partitioned, gradients not
        dev, cpu = 2 * num_params + 6 * num_params + int(12 * num_params / total), 4 * num_params * gpus_per_node * 1.5
        source = "ZeRO paper accounting (2 + 6 + 12/N bytes per parameter)"
    else:
        dev, cpu = 20 * num_params, 4 * num_params * gpus_per_node * 1.5
        source = "ZeRO paper accounting (20 bytes per parameter, nothing partitioned)"
    return {
        "per_device_gb": dev / GB,
        "per_node_cpu_gb": cpu / GB,
        "num_params": num_params,
        "devices": total,
        "source": source,
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


def run_memory(cfg: DictConfig, configs: dict, sizes: dict, gpus_per_node: int, nodes: int) -> dict:
    """The model states of every engine of a run, per device and per node's CPU: trained engines by
    model_state_memory (with their own ZeRO settings), frozen ones by frozen_model_memory. `sizes` maps an engine's
    name to (parameters, largest layer's parameters); "" is the trained model."""
    params, largest = sizes[""]
    trained = model_state_memory(cfg, params, largest, gpus_per_node, nodes)
    engines = {
        "": {
            "per_device_gb": trained["per_device_gb"],
            "per_node_cpu_gb": trained["per_node_cpu_gb"],
            "num_params": params,
            "trained": True,
        }
    }
    for name, ds in configs.items():
        if not name:
            continue
        n, big = sizes.get(name) or sizes[""]
        if "optimizer" in ds:  # another trained model (PPO's critic)
            own = model_state_memory(OmegaConf.create({"zero": ds["zero_optimization"]}), n, big, gpus_per_node, nodes)
            cpu, dev = own["per_node_cpu_gb"] * GB, own["per_device_gb"] * GB
        else:
            cpu, dev = frozen_model_memory(n, big, ds, gpus_per_node, nodes)
        engines[name] = {
            "per_device_gb": dev / GB,
            "per_node_cpu_gb": cpu / GB,
            "num_params": n,
            "trained": "optimizer" in ds,
        }
    return {
        **trained,
        "per_device_gb": sum(e["per_device_gb"] for e in engines.values()),
        "per_node_cpu_gb": sum(e["per_node_cpu_gb"] for e in engines.values()),
        "engines": engines,
    }
