"""Model-state memory per device before launch, from DeepSpeed's own estimators (ZeRO-2/3) and the ZeRO paper's
accounting for stages 0 and 1. Works offline: it needs only the parameter counts the model presets carry."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

GB = 1024**3


def model_state_memory(cfg: DictConfig, num_params: int, largest_layer: int, gpus_per_node: int, nodes: int) -> dict:
    """Bytes per device and per node's CPU for the model states (params, grads, optimizer) of the training engine.

    DeepSpeed's estimators assume mixed precision with Adam: 2 bytes of 16-bit parameters plus 18 bytes per parameter of
    16/32-bit gradients, fp32 master weights and two Adam moments, divided by the ZeRO stage's partitioning.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    stage = int(cfg.zero.stage)
    offload_opt = OmegaConf.select(cfg.zero, "offload_optimizer.device", default="none") not in ("none", None)
    offload_param = OmegaConf.select(cfg.zero, "offload_param.device", default="none") not in ("none", None)
    total = gpus_per_node * nodes
    if stage == 3:
        cpu, dev, _ = estimate_zero3_model_states_mem_needs(
            num_params, largest_layer, gpus_per_node, nodes, cpu_offload=offload_opt, cpu_offload_params=offload_param
        )
        source = "deepspeed estimate_zero3_model_states_mem_needs"
    elif stage == 2 or (stage == 1 and offload_opt):
        cpu, dev = estimate_zero2_model_states_mem_needs(num_params, gpus_per_node, nodes, cpu_offload=offload_opt)
        source = "deepspeed estimate_zero2_model_states_mem_needs"
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
