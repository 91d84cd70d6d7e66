"""Rollouts for on-policy methods: sample answers to prompts with the policy's engine, then score what was
sampled (the policy's and the reference's log-probs, the critic's values, the judge's scores) into an
`Experience`. Under ZeRO-3 all ranks generate in lockstep (`synced_gpus`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from omegaconf import DictConfig

from runner.data.batches import pad
from runner.rl.experience import Experience, action_mask
from runner.rl.ops import logprobs_and_entropy, logprobs_of, masked_mean
from runner.train import gathered, vllm_rollout


def is_vllm(policy) -> bool:
    return isinstance(policy, vllm_rollout.VllmRollout)


def generation_config(gen: DictConfig, pad_id: int, eos_id: int):
    """transformers' GenerationConfig from the step's sampling keys (step.generation.*)."""
    from transformers import GenerationConfig

    kwargs = {
        "max_new_tokens": int(gen.max_new_tokens),
        "do_sample": bool(gen.do_sample),
        "pad_token_id": pad_id,
        "eos_token_id": eos_id,
        "use_cache": True,
        "repetition_penalty": float(gen.repetition_penalty),
    }
    if gen.do_sample:
        kwargs.update(temperature=float(gen.temperature), top_k=int(gen.top_k) or None, top_p=float(gen.top_p))
    return GenerationConfig(**kwargs)


def generate(
    policy, prompts: list[list[int]], config, pad_id: int, eos_id: int, device, synced: bool
) -> list[list[int]]:
    """Answers (token ids, up to and including eos) to prompts, left-padded together into one batch. `policy`: the
    engine, its gathered copy (runner.train.gathered: refreshed first; whole, so no lockstep), or vLLM
    (runner.train.vllm_rollout: weights pushed first)."""
    if is_vllm(policy):
        return policy.generate(prompts, config, eos_id)
    policy = gathered.current(policy)
    synced = synced and policy.zero_optimization_partition_weights()
    ids, mask = pad(prompts, pad_id, side="left")
    policy.eval()
    with torch.no_grad():
        out = policy.module.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config, synced_gpus=synced
        )
    policy.train()
    answers = []
    for row in out[:, ids.size(1) :].tolist():
        answers.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return answers


def experience(
    prompts: list[list[int]],
    answers: list[list[int]],
    pad_id: int,
    device,
    policy,
    score: Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor],
    reference=None,
    critic=None,
) -> Experience:
    """Prompt+answer rows, right-padded, scored: the answer tokens' log-probs under the policy (and the reference),
    the policy's mean entropy over them, the critic's values, and `score(ids, mask, prompt_lens)` per answer (a
    judge's (scores, {term: scores}) keeps each term's too). Answers vLLM sampled are scored by the actor's engine;
    vLLM's own log-probs of them are kept beside (Experience.rollout_logprobs) for the mismatch metric."""
    sampled = policy.last_logprobs if is_vllm(policy) else None
    policy = policy.engine if is_vllm(policy) else gathered.current(policy)
    ids, mask = pad([p + a for p, a in zip(prompts, answers)], pad_id)
    actions = action_mask([len(p) for p in prompts], [len(a) for a in answers], ids.size(1))
    ids, mask, actions = ids.to(device), mask.to(device), actions.to(device)
    policy.eval()
    with torch.no_grad():
        logits = policy(input_ids=ids, attention_mask=mask).logits
        logprobs, entropy = logprobs_and_entropy(logits, ids)
        entropy = masked_mean(entropy, actions)
        del logits
        ref_logprobs = (
            logprobs_of(reference(input_ids=ids, attention_mask=mask).logits, ids) if reference is not None else None
        )
        values = critic(ids, mask)[:, :-1] if critic is not None else None
        scores = score(ids, mask, [len(p) for p in prompts])
    terms = None
    if isinstance(scores, tuple):
        scores, parts = scores
        terms = torch.stack([v.float() for v in parts.values()], dim=1) if parts else None
    policy.train()
    if sampled is not None:
        sampled = vllm_rollout.rollout_logprobs(sampled, [len(p) for p in prompts], ids.size(1)).to(device)
    return Experience(
        input_ids=ids,
        attention_mask=mask,
        action_mask=actions,
        logprobs=logprobs,
        scores=scores,
        entropy=entropy.reshape(1),
        ref_logprobs=ref_logprobs,
        values=values,
        term_scores=terms,
        rollout_logprobs=sampled,
    )


def sampler(engine, cfg: DictConfig, run_dir, lora_r: int):
    """What a policy's rollouts go through: vLLM (step.rollout.backend=vllm), the engine's whole copy
    (step.rollout.gathered_copy, a ZeRO-3 policy), or the engine itself. The driver resolved and checked both keys."""
    rollout = cfg.step.rollout
    if rollout.backend == "vllm":
        gen, longest = cfg.step.generation, int(cfg.step.max_prompt_len)
        max_len = longest + int(gen.max_new_tokens)
        return vllm_rollout.VllmRollout(engine, rollout.vllm, run_dir, cfg.precision.dtype, max_len, cfg.lora, lora_r)
    return gathered.for_rollouts(engine, rollout.gathered_copy, cfg.lora, lora_r)


def hybrid_engine_status(actor, enabled: bool) -> str | None:
    """What DeepSpeed's hybrid engine does for this actor, in words (None when it was not asked for)."""
    if not enabled:
        return None
    import deepspeed

    if len(getattr(actor, "_inference_containers", [])) > 0:
        return "hybrid engine: active (DeepSpeed's inference kernels generate the rollouts)"
    return (
        f"hybrid engine: requested, but DeepSpeed {deepspeed.__version__} has no inference policy for "
        f"{type(actor.module).__name__}, so it cannot be applied: rollouts use the model's own generate() "
        "(same results, no speed-up)"
    )


def make_judge(cfg: DictConfig, run_dir, tokenizer, pad_id: int):
    """The `reward` group as a Judge on this rank: its functions, and a frozen engine for each reward-model term
    (ds_config.judge<i>.json)."""
    from omegaconf import OmegaConf

    from runner.rewards.judge import Judge
    from runner.train import engine as eng, models

    models_ = {}
    for i, term in enumerate(cfg.reward.terms):
        if term.get("model"):
            ds = eng.ds_config(run_dir, f"judge{i}")
            source = OmegaConf.create({"path": term.model, "dropout": None})
            models_[i] = eng.initialize_frozen(models.load_scalar_model(source, ds, cfg.precision.dtype, pad_id), ds)
    return Judge(cfg.reward, tokenizer, models_)


def capped(config, positions: int | None, longest_prompt: int):
    """A generation config whose answers fit the model's positions after the longest prompt of the batch."""
    import copy

    if positions is None or longest_prompt + config.max_new_tokens <= positions:
        return config
    config = copy.deepcopy(config)
    config.max_new_tokens = max(1, positions - longest_prompt)
    return config
