"""How the ranks split the work: the `parallel` degrees (tensor, sequence, data; pipeline refused) and ZeRO++'s
keys, resolved and checked against the world size, the batch and the model before any JSON is built.

    parallel.data = world size / (parallel.tensor x parallel.sequence)      (derived here, once)

Each rule is one DeepSpeed 0.19.8 enforces or silently mishandles; the messages say which.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from runner.driver import checks
from runner.errors import ConfigError

ZEROPP = ("zero_quantized_weights", "zero_quantized_nontrainable_weights", "zero_quantized_gradients")
# Methods whose ranks feed one batch per data-parallel group (runner.train.parallel); the others sample answers per
# rank (generation), which a tensor- or sequence-parallel group would have to do in lockstep.
WIRED = ("sft",)
PIPELINE_WHY = (
    "DeepSpeed's pipeline engine trains only a deepspeed.pipe.PipelineModule (the model rewritten as a flat list of "
    "layers with its loss inside) through engine.train_batch(); it refuses forward(), backward() and step() ('Only "
    "train_batch() is accessible in pipeline mode'), which every method here calls, and PPO/GRPO also generate with "
    "the model. The Hugging Face presets (OPT, Llama, Qwen) are not PipelineModules"
)


def resolve_degrees(cfg: DictConfig, world: int) -> None:
    """parallel.*: positive degrees whose product divides the world size; parallel.data derived from them."""
    par = cfg.parallel
    checks.positive_int(cfg, "parallel.tensor", "parallel.sequence", "parallel.pipeline")
    if par.pipeline != 1:
        raise ConfigError(
            "parallel.pipeline", f"pipeline parallelism is not supported: {PIPELINE_WHY}", "use parallel.pipeline=1"
        )
    tensor, sequence = int(par.tensor), int(par.sequence)
    model = tensor * sequence
    if world % model:
        raise ConfigError(
            "parallel.tensor" if tensor > 1 else "parallel.sequence",
            f"tensor x sequence = {tensor} x {sequence} = {model} does not divide the world size {world}",
            f"use degrees whose product divides {world}, or change deployment.nproc_per_node",
        )
    data = world // model
    if par.data != "auto" and par.data != data:
        raise ConfigError(
            "parallel.data",
            f"is derived (world size {world} / (tensor {tensor} x sequence {sequence}) = {data}), got {par.data!r}",
            "leave parallel.data=auto; set the world size and parallel.tensor / parallel.sequence instead",
        )
    par.data = data


def check(cfg: DictConfig, world: int, nodes: dict[str, int], notes: list[str]) -> None:
    """What the degrees need of the method and the model, and ZeRO++ in every trained model's zero block."""
    accelerator, per_node = cfg.deployment.accelerator, min(nodes.values()) if nodes else world
    zero_blocks = [("zero", cfg.zero)] + [
        (f"step.{name}.zero", block.zero)
        for name, block in cfg.step.items()
        if isinstance(block, DictConfig) and isinstance(block.get("zero"), DictConfig)
    ]
    for key, block in zero_blocks:
        zeropp(block, key, accelerator, per_node, len(nodes) or 1, notes)
    par = cfg.parallel
    tensor, sequence, data = int(par.tensor), int(par.sequence), int(par.data)
    if tensor * sequence == 1:
        return
    if tensor > 1 and sequence > 1:
        raise ConfigError(
            "parallel.sequence",
            "tensor and sequence parallelism together are not wired: DeepSpeed 0.19.8 builds AutoTP's groups from "
            "its own device mesh and Ulysses' from the mpu it is handed, and refuses a TP group source beside an mpu",
            "choose one of parallel.tensor or parallel.sequence",
        )
    key = "parallel.tensor" if tensor > 1 else "parallel.sequence"
    if str(cfg.step.name) not in WIRED:
        raise ConfigError(
            key,
            f"step={cfg.step.name} is not wired for {key.split('.')[1]} parallelism (it is for step="
            f"{', '.join(WIRED)}): its ranks sample answers or read pairs each on their own",
            f"use {key}=1 for this method",
        )
    for bad, why in (
        (cfg.lora.r, "LoRA adapters (peft layers are not AutoTP/Ulysses layers)"),
        (OmegaConf.select(cfg, "reward.terms"), "a judge (reward=...): held-out answers are sampled per rank"),
        (cfg.train.adapt.enabled and cfg.train.adapt.batch_beta != 1, "train.adapt changing the batch"),
        (cfg.data.get("packing"), "data.packing (packed rows carry their own positions and block mask)"),
    ):
        if bad:
            raise ConfigError(key, f"is not wired together with {why}", f"use {key}=1, or turn that off")
    heads = OmegaConf.select(cfg, "model.arch.num_attention_heads")
    kv = OmegaConf.select(cfg, "model.arch.num_key_value_heads") or heads
    degree = tensor * sequence
    if heads and (heads % degree or kv % degree):
        raise ConfigError(
            key,
            f"{degree} does not divide the model's {heads} attention heads ({kv} key-value heads): "
            + ("AutoTP splits each layer by heads" if tensor > 1 else "Ulysses gives each rank whole heads"),
            f"use a degree that divides {kv}",
        )
    notes.append(
        f"parallel: {world} ranks = data {data} x {key.split('.')[1]} {degree}; each group of {degree} consecutive "
        f"ranks trains on the same batch (train_batch_size = micro x accumulation x data = "
        f"{int(cfg.train.micro_batch_size) * int(cfg.train.gradient_accumulation_steps) * data})"
    )


def zeropp(block: DictConfig, key: str, accelerator: str, ranks_per_node: int, nodes: int, notes: list[str]) -> None:
    """ZeRO++ (qwZ, qgZ, hpZ) in one zero block: stage 3 only, hpZ's partition inside a node, and not on the CPU
    accelerator for the quantized collectives (DeepSpeed's CPU op builder has no quantizer kernels)."""
    hpz = block.get("zero_hpz_partition_size")
    on = [k for k in ZEROPP if block.get(k)] + (["zero_hpz_partition_size"] if hpz not in (None, 1) else [])
    if not on:
        return
    if block.stage != 3:
        raise ConfigError(
            f"{key}.{on[0]}",
            f"is ZeRO++, which partitions parameters: it needs ZeRO stage 3, but {key}.stage={block.stage} "
            "(DeepSpeed reads it only in its stage-3 partitioner and would ignore it)",
            "use zero=stage3_zeropp, or remove the key",
        )
    if hpz == "auto":
        block.zero_hpz_partition_size = hpz = ranks_per_node if nodes > 1 else 1
        notes.append(
            f"{key}.zero_hpz_partition_size=auto: {hpz}"
            + (
                f" (the {ranks_per_node} ranks of a node hold a secondary copy of the parameters)"
                if nodes > 1
                else " (one node: a secondary partition over the whole node is the primary one; hpZ is off)"
            )
        )
    if not isinstance(hpz, int) or isinstance(hpz, bool) or hpz < 1:
        raise ConfigError(f"{key}.zero_hpz_partition_size", f"must be a positive integer or auto, got {hpz!r}")
    if hpz > 1 and (hpz > ranks_per_node or ranks_per_node % hpz):
        raise ConfigError(
            f"{key}.zero_hpz_partition_size",
            f"{hpz} does not divide the {ranks_per_node} ranks per node: DeepSpeed groups consecutive ranks "
            "(utils/groups.py _create_zero_param_parallel_group), so the secondary partition would span nodes, "
            "which is what hpZ exists to avoid",
            f"use a divisor of {ranks_per_node} (the GPUs per node), or auto",
        )
    if hpz > 1 and nodes == 1:
        notes.append(
            f"{key}.zero_hpz_partition_size={hpz} on one node: the secondary partition saves no inter-node traffic "
            "(there is none); it only shows that hpZ runs"
        )
    quantized = [k for k in ZEROPP if block.get(k)]
    if quantized and accelerator == "cpu":
        raise ConfigError(
            f"{key}.{quantized[0]}",
            "ZeRO++'s quantized collectives need DeepSpeed's CUDA quantizer kernels; on the CPU accelerator "
            "DeepSpeed refuses with 'This op had not been implemented on CPU backend.' (QuantizerBuilder)",
            f"set {key}.zero_quantized_weights=false {key}.zero_quantized_gradients=false (hpZ alone runs on CPU), "
            "or run on GPUs",
        )
