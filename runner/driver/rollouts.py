"""What an on-policy method's rollouts run on, as the driver resolves and checks it: the backend
(`step.rollout.backend`: transformers' generate() or vLLM) and a ZeRO-3 policy's whole copy
(`step.rollout.gathered_copy`)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from runner.driver.checks import number, positive_int
from runner.errors import ConfigError

BACKENDS = ("hf", "vllm")


def backend(cfg: DictConfig, notes: list[str], hybrid: bool = False) -> None:
    """step.rollout.backend: hf, or vllm (runner.train.vllm_rollout) on CUDA GPUs with the package installed, its
    step.rollout.vllm keys in range; vllm with DeepSpeed's hybrid engine, a whole copy or tensor parallelism is
    refused. A dry run without vllm installed is planned with a note."""
    key, backend = "step.rollout.backend", OmegaConf.select(cfg, "step.rollout.backend")
    if backend not in BACKENDS:
        raise ConfigError(key, f"unknown rollout backend {backend!r}", "use hf (transformers' generate) or vllm")
    if backend != "vllm":
        return
    if cfg.deployment.accelerator != "cuda":
        raise ConfigError(
            key,
            f"vLLM generates on CUDA GPUs; this run's deployment ({cfg.deployment.name}) uses DeepSpeed's "
            f"{cfg.deployment.accelerator} accelerator",
            f"use {key}=hf here, or a GPU deployment (deployment=single_gpu, single_node, multi_node, slurm)",
        )
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        missing = "vLLM is not installed in this Python environment"
        fix = "install it with `pip install .[vllm]` (or EXTRAS=vllm bash scripts/install.sh) on the GPU machine"
        if not cfg.dry_run:
            raise ConfigError(key, missing, fix)
        notes.append(f"{key}=vllm: {missing}; {fix} before the real run")
    if hybrid:
        raise ConfigError(
            key, "vLLM and DeepSpeed's hybrid engine both generate the rollouts", "drop step.hybrid_engine.enabled=true"
        )
    if OmegaConf.select(cfg, "step.rollout.gathered_copy") is True:
        raise ConfigError(
            "step.rollout.gathered_copy", "vLLM holds its own whole copy of the policy", "drop it (or set it to auto)"
        )
    cfg.step.rollout.gathered_copy = False
    if int(OmegaConf.select(cfg, "parallel.tensor", default=1) or 1) > 1:
        raise ConfigError(
            key, "vLLM rollouts beside AutoTP training (parallel.tensor > 1) are not wired", f"use {key}=hf"
        )
    v = "step.rollout.vllm"
    share = OmegaConf.select(cfg, f"{v}.gpu_memory_utilization")
    if not (number(share) and 0 < share < 1):
        raise ConfigError(
            f"{v}.gpu_memory_utilization",
            f"must be a share of the GPU between 0 and 1 (vLLM's weights and KV cache), got {share!r}",
            "e.g. 0.3: the rest is left to DeepSpeed's engines",
        )
    if OmegaConf.select(cfg, f"{v}.sleep_level") not in (0, 1, 2):
        raise ConfigError(
            f"{v}.sleep_level",
            f"must be 0, 1 or 2, got {OmegaConf.select(cfg, f'{v}.sleep_level')!r}",
            "2: vLLM frees its weights and KV cache while DeepSpeed trains (they are pushed again before each "
            "rollout); 1: weights kept in host memory; 0: vLLM stays awake",
        )
    positive_int(cfg, f"{v}.max_num_seqs")
    temperature = OmegaConf.select(cfg, "step.generation.temperature")
    if OmegaConf.select(cfg, "step.generation.do_sample") and number(temperature) and temperature > 2:
        raise ConfigError(
            "step.generation.temperature", f"vLLM samples at temperatures up to 2, got {temperature}", f"or {key}=hf"
        )
    if not isinstance(OmegaConf.select(cfg, f"{v}.enforce_eager"), bool):
        raise ConfigError(f"{v}.enforce_eager", "must be true or false")
    notes.append(
        f"{key}=vllm: each rank's vLLM holds {share:.0%} of its GPU while it generates; the actor's weights are "
        "pushed to it after each update and the answers are scored by the actor (metric logprob_mismatch)"
    )


def gathered_copy(cfg: DictConfig, stage: int, notes: list[str], hybrid: bool = False) -> None:
    """step.rollout.gathered_copy: auto -> true for a ZeRO-3 policy (runner.train.gathered), false otherwise; true
    where the policy is already whole, or with DeepSpeed's hybrid engine or tensor parallelism, is refused."""
    key, value = "step.rollout.gathered_copy", OmegaConf.select(cfg, "step.rollout.gathered_copy")
    tensor = int(OmegaConf.select(cfg, "parallel.tensor", default=1) or 1)
    if value == "auto":
        value = stage == 3 and not hybrid and tensor == 1
        cfg.step.rollout.gathered_copy = value
        if value:
            notes.append(
                f"{key}: the ZeRO-3 policy generates from a whole copy of its weights on each device, refreshed after "
                f"each update (one more model per device, in the plan); {key}=false generates through the shards"
            )
        return
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be auto, true or false, got {value!r}")
    if value and stage != 3:
        raise ConfigError(
            key, f"the policy is at ZeRO stage {stage}: its weights are whole already", f"drop {key}=true (or auto)"
        )
    if value and (hybrid or tensor > 1):
        what = "DeepSpeed's hybrid engine gathers the actor itself" if hybrid else "tensor-parallel shards"
        raise ConfigError(key, f"cannot be used with {what}", f"set {key}=false (or auto)")
