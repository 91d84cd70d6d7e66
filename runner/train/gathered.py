"""A whole, unsharded copy of a ZeRO-3 policy for its rollouts (`step.rollout.gathered_copy`).

Under ZeRO-3 every forward pass all-gathers each layer's parameters from the other ranks and frees them again, and
generation runs one forward pass per answer token, all ranks in lockstep: on 2 CPU ranks the tiny recipe's
generation took 4.5x as long as at ZeRO-0. DeepSpeed's hybrid engine answers this by gathering the actor once for
generation, but it has no inference policy for current OPT or Llama models. This is the same idea without its
kernels: a plain transformers model of the policy's architecture on each device, its weights copied from the sharded
engine (gathered one transformer block at a time, LoRA adapters merged) whenever the engine has taken an optimizer
step since the last copy. The copy generates the answers and gives the policy's log-probs of them (the same weights,
the same forward pass: the same numbers as the sharded engine's); training still runs through the engine.

Memory: one more copy of the model's weights (in the training dtype) per device, counted by the plan
(runner.driver.memory), and one gathered block at a time while it is refreshed.
"""

from __future__ import annotations

import re

import torch


def blocks(names: list[str]) -> list[list[str]]:
    """Parameter names grouped by transformer block (the name up to its first numeric part, `model.layers.3`);
    names outside any block (embeddings, final norm, head) form one group. Order kept."""
    groups: dict[str, list[str]] = {}
    for name in names:
        match = re.match(r"^(.*?\.\d+)\.", name)
        groups.setdefault(match.group(1) if match else "", []).append(name)
    return list(groups.values())


class GatheredCopy:
    """Quacks like the policy's engine where rollouts use it: `module`, `eval()`, `train()`, calling it, and
    `zero_optimization_partition_weights()` (False: it is whole, no lockstep needed). `refresh()` copies the engine's
    current weights when it has stepped since the last copy; rollout.generate and rollout.experience call it."""

    def __init__(self, engine, lora=None, lora_r: int = 0):
        from transformers import AutoModelForCausalLM

        self.engine, self.lora, self.lora_r = engine, lora, int(lora_r or 0)
        params = list(engine.module.parameters())
        config = engine.module.config.__class__.from_dict(engine.module.config.to_dict())
        config.use_cache = True  # (gradient checkpointing turns it off on the trained model)
        # built in host memory, then moved (building under torch.device() was 30x slower beside ZeRO-3's patches)
        self.module = AutoModelForCausalLM.from_config(config, dtype=params[0].dtype).to(engine.device).eval()
        self.module.requires_grad_(False)
        self.copied_at = None

    def refresh(self) -> GatheredCopy:
        """The engine's weights, gathered block by block on every rank (a collective: all ranks call it at the same
        step), LoRA merged, copied into the whole model; skipped when the engine has not stepped since."""
        import deepspeed

        from runner.train.models import merge_lora

        steps = int(self.engine.global_steps)
        if self.copied_at == steps:
            return self
        named = dict(self.engine.module.named_parameters())
        target = dict(self.module.named_parameters())
        for group in blocks(list(named)):
            with deepspeed.zero.GatheredParameters([named[n] for n in group], modifier_rank=None):
                state = {n: named[n].data for n in group}
                if self.lora_r:
                    state = merge_lora(state, self.lora, self.lora_r)
                with torch.no_grad():
                    for name, value in state.items():
                        target[name].copy_(value)
        self.copied_at = steps
        return self

    def zero_optimization_partition_weights(self) -> bool:
        return False

    def eval(self) -> None:
        pass

    def train(self) -> None:
        pass

    def __call__(self, **inputs):
        return self.module(**inputs)


def for_rollouts(engine, setting: bool, lora=None, lora_r: int = 0):
    """The policy rollouts use: a GatheredCopy of a ZeRO-3 engine when `setting` (step.rollout.gathered_copy,
    resolved by the driver), else the engine itself."""
    return GatheredCopy(engine, lora, lora_r) if setting else engine


def current(policy):
    """The policy to generate with now: a GatheredCopy refreshed (a collective), anything else as it is."""
    return policy.refresh() if isinstance(policy, GatheredCopy) else policy
