"""Rollouts through vLLM, colocated with the DeepSpeed engines on the same GPUs (`step.rollout.backend=vllm`).

Each rank runs its own vLLM engine in its own process (vLLM's `external_launcher` executor: no extra processes,
the launcher's ranks are vLLM's), holding `step.rollout.vllm.gpu_memory_utilization` of its GPU while awake. One
rollout on a rank:

1. `refresh()`: wake vLLM's weights; when the actor has taken an optimizer step since the last push (or the engine
   slept at level 2, which drops them), gather its weights one transformer block at a time (a collective under
   ZeRO-3: every rank pushes at the same step), fold LoRA adapters in, and load them into vLLM's model; then wake
   its KV cache and drop cached prefixes that were computed with the old weights.
2. `generate()`: the step's sampling keys mapped one to one onto vLLM's `SamplingParams` (greedy = temperature 0,
   top_k 0 = vLLM's -1); one seed per prompt drawn from torch's generator, so a seeded run, a resumed run and the
   fixed-seed held-out evaluation draw the same answers each time. vLLM returns the sampled tokens' log-probs.
3. `sleep()`: vLLM releases its GPU memory (level 1: weights to host memory, KV cache dropped; level 2: both dropped)
   while DeepSpeed trains.

The answers are scored by the actor's engine itself (rollout.experience): the PPO/GRPO ratio uses the actor's
log-probs, never vLLM's, and the mean absolute difference between the two on the answer tokens is reported as the
`logprob_mismatch` metric (kernels, precision and batch shapes differ; a growing value means the rollouts are drawn
from a policy the trainer does not have).

vLLM is imported only here and only when the backend is chosen; the driver refuses the backend on a CPU
deployment or without the package (runner.driver.rollouts.backend).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from runner.train.gathered import blocks


def sampling_params(config, seeds: list[int], logprobs: bool = True) -> list:
    """vLLM SamplingParams, one per prompt, from a transformers GenerationConfig (rollout.generation_config): the
    same sampling, stated in vLLM's terms."""
    from vllm import SamplingParams

    return [SamplingParams(**sampling_kwargs(config), seed=int(s), logprobs=0 if logprobs else None) for s in seeds]


def sampling_kwargs(config) -> dict:
    """The keyword arguments of vLLM's SamplingParams for a transformers GenerationConfig: greedy decoding is
    temperature 0; top_k None/0 (off) is -1; the answer stops at (and keeps) the eos token, and only at it."""
    sample = bool(config.do_sample)
    return {
        "n": 1,
        "max_tokens": int(config.max_new_tokens),
        "temperature": float(config.temperature) if sample else 0.0,
        "top_p": float(config.top_p) if sample and config.top_p is not None else 1.0,
        "top_k": int(config.top_k) if sample and config.top_k else -1,
        "repetition_penalty": float(config.repetition_penalty or 1.0),
        "stop_token_ids": [int(config.eos_token_id)],
        "ignore_eos": True,  # only the eos above stops (as generate()), not others vLLM reads from the model's config
        "detokenize": False,
    }


def answer_of(completion, eos_id: int, max_new_tokens: int) -> tuple[list[int], list[float]]:
    """An answer's token ids (up to and including eos, as rollout.generate returns them) and vLLM's log-prob of each,
    from a vLLM CompletionOutput (`token_ids`, `logprobs`: one {token id: Logprob} per position, `finish_reason`)."""
    ids = list(completion.token_ids)[:max_new_tokens]
    lps = [float(step[tok].logprob) for tok, step in zip(ids, completion.logprobs or [])]
    if eos_id in ids:
        cut = ids.index(eos_id) + 1
        ids, lps = ids[:cut], lps[:cut]
    return ids, lps


def model_config(module):
    """The policy's transformers config as vLLM builds the model from it: a copy naming its architecture (a model
    built from a config names none, and vLLM would take its base model, which cannot generate); LoRA's wrapper
    skipped (its adapters are merged into the pushed weights)."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    config = base.config.__class__.from_dict(base.config.to_dict())
    config.architectures = [type(base).__name__]
    return config


class VllmRollout:
    """Quacks like the policy's engine where rollouts use it (rollout.generate, onpolicy.judged_heldout): `module`,
    `zero_optimization_partition_weights()`; `engine` scores the answers. `last_logprobs` holds vLLM's log-probs of
    the last generate()'s answers for the mismatch metric."""

    def __init__(self, engine, settings, run_dir: Path, dtype: str, max_len: int, lora=None, lora_r: int = 0):
        from vllm import LLM

        self.engine, self.settings, self.lora, self.lora_r = engine, settings, lora, int(lora_r or 0)
        self.module = engine.module
        self.sleep_level = int(settings.sleep_level)
        # vLLM builds the model from a config.json; its weights come from the engine (load_format=dummy: no second
        # read of the checkpoint), pushed before the first generation
        model_dir = run_dir / "vllm_model"
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            model_config(engine.module).save_pretrained(model_dir)
        torch.distributed.barrier()
        self.llm = LLM(
            model=str(model_dir),
            load_format="dummy",
            skip_tokenizer_init=True,
            dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype],
            distributed_executor_backend="external_launcher",
            tensor_parallel_size=1,
            gpu_memory_utilization=float(settings.gpu_memory_utilization),
            max_model_len=int(max_len),
            max_num_seqs=int(settings.max_num_seqs),
            enforce_eager=bool(settings.enforce_eager),
            enable_sleep_mode=self.sleep_level > 0,
            enable_prefix_caching=True,
            seed=int(os.environ.get("RANK", "0")),
        )
        self.pushed_at, self.asleep, self.last_logprobs = None, False, None
        self.sleep()

    def zero_optimization_partition_weights(self) -> bool:
        return False  # vLLM's copy is whole: no lockstep generation

    def refresh(self) -> VllmRollout:
        """Wake vLLM and push the actor's current weights into it when it has stepped since the last push (or vLLM
        dropped them in its sleep); a collective under ZeRO-3."""
        import deepspeed

        from runner.train.models import merge_lora

        steps = int(self.engine.global_steps)
        stale = self.pushed_at != steps or (self.asleep and self.sleep_level == 2)
        if self.asleep:
            torch.cuda.empty_cache()  # DeepSpeed's cached blocks back to the device before vLLM takes its share
            self.llm.wake_up(tags=["weights"])
        if stale:
            model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
            named = dict(self.engine.module.named_parameters())
            for group in blocks(list(named)):
                with deepspeed.zero.GatheredParameters([named[n] for n in group], modifier_rank=None):
                    state = {n: named[n].data for n in group}
                    if self.lora_r:
                        state = merge_lora(state, self.lora, self.lora_r)
                    model.load_weights(list(state.items()))
            self.pushed_at = steps
        if self.asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        if stale:
            self.llm.reset_prefix_cache()
        return self

    def sleep(self) -> None:
        if self.sleep_level and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    def generate(self, prompts: list[list[int]], config, eos_id: int) -> list[list[int]]:
        """Answers to `prompts` (token ids, up to and including eos); vLLM's log-probs of them in last_logprobs."""
        self.refresh()
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()  # torch's stream: seeded, resumed, evaluated
        outs = self.llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompts], sampling_params(config, seeds), use_tqdm=False
        )
        got = [answer_of(o.outputs[0], eos_id, int(config.max_new_tokens)) for o in outs]
        self.sleep()
        self.last_logprobs = [lp for _, lp in got]
        return [ids for ids, _ in got]


def rollout_logprobs(logprobs: list[list[float]], prompt_lens: list[int], width: int) -> torch.Tensor:
    """vLLM's per-answer log-probs laid out like Experience.logprobs: (B, width - 1), answer token j of row i at
    position prompt_len - 1 + j, zeros elsewhere (see runner.rl.experience.action_mask)."""
    out = torch.zeros(len(logprobs), width - 1)
    for i, (lps, p) in enumerate(zip(logprobs, prompt_lens)):
        out[i, p - 1 : p - 1 + len(lps)] = torch.tensor(lps, dtype=torch.float32)
    return out
