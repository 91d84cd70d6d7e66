"""What on-policy methods (PPO, and the critic-free methods after it) share beside the rollout itself: collecting
a step's experience with timings, the per-step metrics (means over ranks), the held-out evaluation of the policy
(answers sampled with a fixed seed, so evaluations are comparable over steps), and sample answers in samples.jsonl."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from runner.rl.experience import Experience
from runner.train import engine as eng
from runner.train.engine import Dist

EVAL_SEED = 99991


@dataclasses.dataclass
class Rollout:
    """One step's experience, what a trainer's generate_experience() returns and its train() consumes."""

    exp: Experience  # answers with their log-probs (policy, reference), scores (and values: PPO; groups: GRPO)
    gen_time: float  # seconds generating answers (this rank)
    exp_time: float  # seconds scoring them into experience
    rows: list[dict]  # the first batch's prompts and answers (for samples.jsonl)
    answers: list[list[int]]
    advantages: torch.Tensor | None = None  # (B, T-1) per answer token, set by the trainer
    returns: torch.Tensor | None = None  # (B, T-1) the critic's targets (PPO)
    score_stats: list[float] | None = None  # [count, sum, sum of squares] of the scores over every rank
    group_counts: list[float] | None = None  # GRPO: prompt groups sampled and those whose answers all scored the same
    started: float = dataclasses.field(default_factory=time.perf_counter)  # when the step began


def collect(batches: int, next_rows: Callable[[], list[dict]], generate, experience, pad_id: int, device) -> Rollout:
    """`batches` rollout batches: prompts from `next_rows()`, answers from `generate(rows)`, scored by
    `experience(rows, answers)`; concatenated into one Experience."""
    gen_time = exp_time = 0.0
    parts, first = [], None
    for _ in range(batches):
        rows = next_rows()
        t0 = eng.now(device)
        answers = generate(rows)
        t1 = eng.now(device)
        parts.append(experience(rows, answers))
        exp_time += eng.now(device) - t1
        gen_time += t1 - t0
        first = first or (rows, answers)
    return Rollout(Experience.concat(parts, pad_id), gen_time, exp_time, *first)


def score_sums(scores: torch.Tensor, device) -> list[float]:
    """[count, sum, sum of squares] of the scores over every rank."""
    return eng.all_reduce_sum([scores.numel(), float(scores.sum()), float((scores**2).sum())], device)


def step_metrics(
    dist: Dist,
    exp: Experience,
    score_stats: list[float],
    losses: dict,
    chunks: int,
    advantages: torch.Tensor,
    returns: torch.Tensor | None,
    times: tuple[float, float, float],
    step_time: float,
) -> dict:
    """A step's metrics, means over ranks: rewards, KL to the reference (when there is one), entropy, losses (sums
    over `chunks` training chunks), answer length, advantages, returns, values, and where the time went."""
    mask = exp.action_mask
    n_answers, score_sum, score_sq = score_stats
    local = {k: v / max(chunks, 1) for k, v in losses.items()}
    keys = sorted(local)
    kl = ((exp.logprobs - exp.ref_logprobs) * mask).sum(1).sum() if exp.ref_logprobs is not None else torch.zeros(())
    values = (exp.values * mask).sum() if exp.values is not None else torch.zeros(())
    returns_sum = returns.sum() if returns is not None else torch.zeros(())
    mismatch = []  # vLLM sampled: |its log-probs - the actor's| summed over the answer tokens (rollout.experience)
    if exp.rollout_logprobs is not None:
        mismatch = [float(((exp.rollout_logprobs - exp.logprobs).abs() * mask).sum())]
    reduced = eng.all_reduce_sum(
        [local[k] for k in keys]
        + [
            float(kl),
            float(mask.sum()),
            float(exp.attention_mask.sum()),
            float(exp.entropy.mean()),
            float(advantages.sum()),
            float(returns_sum),
            float(values),
            *times,
            *mismatch,
        ],
        dist.device,
    )
    means = {k: v / dist.world for k, v in zip(keys, reduced)}
    kl_sum, gen_tokens, all_tokens, entropy, adv_sum, ret_sum, val_sum, g_t, e_t, t_t = reduced[len(keys) :][:10]
    reward_mean = score_sum / max(n_answers, 1)
    out = {
        "reward_mean": reward_mean,
        "reward_std": max(score_sq / max(n_answers, 1) - reward_mean**2, 0.0) ** 0.5,
        "kl": kl_sum / max(n_answers, 1),
        "entropy": entropy / dist.world,
        **means,
        "response_length": gen_tokens / max(n_answers, 1),
        "advantage_mean": adv_sum / max(gen_tokens, 1),
        "return_mean": ret_sum / max(gen_tokens, 1) if returns is not None else None,
        "value_mean": val_sum / max(gen_tokens, 1) if exp.values is not None else None,
        "gen_time_s": g_t / dist.world,
        "experience_time_s": e_t / dist.world,
        "train_time_s": t_t / dist.world,
        "step_time_s": step_time,
        "gen_tokens_per_s": gen_tokens / max(g_t / dist.world, 1e-9),
        "tokens_per_s": all_tokens / max(step_time, 1e-9),
        "samples_per_s": n_answers / max(step_time, 1e-9),  # answers generated and trained on
        "tokens": all_tokens,
        "answers": n_answers,
        "logprob_mismatch": reduced[-1] / max(gen_tokens, 1) if mismatch else None,
        "peak_memory_mb": eng.gather_objects(round(eng.peak_memory_mb(dist.device), 1), dist.world),
    }
    return {k: v for k, v in out.items() if v is not None}


def heldout(
    prompts,
    batch_size: int,
    max_batches: int | None,
    dist: Dist,
    sample: Callable[[list[dict]], Experience],
    terms: list[str] | None = None,
    pass_term: str | None = None,
) -> dict:
    """Mean score (and KL to the reference, answer length; each judge term's mean and the pass rate when given) of the
    policy's answers to held-out prompts, sampled with a fixed seed: every evaluation draws the same random numbers,
    so values are comparable over steps. Every rank runs the same number of batches (ZeRO-3 generates in lockstep); a
    rank with fewer repeats one and discards it."""
    from runner.data.batches import eval_batches

    evals = eval_batches(len(prompts), batch_size, dist.world, dist.rank)
    if max_batches:
        evals = evals[:max_batches]
    longest = max(eng.gather_objects(len(evals), dist.world))
    terms = terms or []
    sums = torch.zeros(5 + len(terms), dtype=torch.float64)
    devices = [dist.device] if dist.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(EVAL_SEED + dist.rank)
        for i in range(longest):
            idx = evals[i] if i < len(evals) else (evals[0] if evals else [0])
            exp = sample([prompts[j] for j in idx])
            if i < len(evals):
                kl = (
                    ((exp.logprobs - exp.ref_logprobs) * exp.action_mask).sum(1)
                    if exp.ref_logprobs is not None
                    else torch.zeros(1)
                )
                s = exp.scores.double().cpu()
                by_term = exp.term_scores.double().sum(0).cpu() if terms else torch.zeros(0, dtype=torch.float64)
                sums += torch.cat(
                    [
                        torch.tensor(
                            [len(s), s.sum(), (s**2).sum(), float(kl.sum()), float(exp.action_mask.sum())],
                            dtype=torch.float64,
                        ),
                        by_term,
                    ]
                )
    n, total, total_sq, kl_sum, length, *by_term = eng.all_reduce_sum(sums.tolist(), dist.device)
    mean = total / max(n, 1)
    out = {
        "reward_mean": mean,
        "reward_std": max(total_sq / max(n, 1) - mean**2, 0.0) ** 0.5,
        "kl": kl_sum / max(n, 1),
        "response_length": length / max(n, 1),
        "prompts": int(n),
        **{f"reward_{name}": v / max(n, 1) for name, v in zip(terms, by_term) if len(terms) > 1},
    }
    if pass_term in terms:  # the share of answers the pass term scores as right (>= 1)
        out["pass_rate"] = by_term[terms.index(pass_term)] / max(n, 1)
    return out


class Prompts:
    """The prompts of a tokenised split of any kind, as prompt rows: prompt rows as they are, SFT rows and pairs cut
    at their prompt."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        if "prompt_ids" in row:
            return row
        ids = row["input_ids"] if "input_ids" in row else row["chosen_ids"]
        return {"prompt_ids": ids[: row["prompt_len"]], "extra": row.get("extra", "{}")}


def judged_heldout(
    policy, prompts: Prompts, judge, cfg, dist: Dist, pad: int, eos: int, reference=None, batch_size: int | None = None
) -> dict:
    """The judge's mean score (and std, answer length, KL to the reference when there is one, each term's mean and
    the pass rate) of the policy's answers to held-out prompts, sampled with step.generation and a fixed seed (see
    heldout)."""
    from runner.train import models, rollout

    gen_config = rollout.generation_config(cfg.step.generation, pad, eos)
    synced = policy.zero_optimization_partition_weights() and dist.world > 1
    positions = models.positions(policy.module)

    def sample(rows: list[dict]) -> Experience:
        prompt_ids = [r["prompt_ids"] for r in rows]
        config = rollout.capped(gen_config, positions, max(len(p) for p in prompt_ids))
        answers = rollout.generate(policy, prompt_ids, config, pad, eos, dist.device, synced)
        extras = [json.loads(r.get("extra") or "{}") for r in rows]
        score = lambda ids, mask, lens: judge(ids, mask, lens, extras)
        return rollout.experience(prompt_ids, answers, pad, dist.device, policy, score, reference=reference)

    max_batches = int(cfg.train.eval_max_batches or 0) or None
    size = batch_size or int(cfg.train.micro_batch_size)
    held = heldout(prompts, size, max_batches, dist, sample, judge.names, judge.pass_term)
    drop = {"prompts"} | (set() if reference is not None else {"kl"})
    return {k: v for k, v in held.items() if k not in drop}


def log_samples(
    path: Path, tokenizer, step: int, rows: list[dict], answers: list[list[int]], scores, n: int = 2
) -> None:
    """The first `n` prompts and answers of a step, with their scores: appended to samples.jsonl and printed (to
    launch.log: the console shows evaluations, not single answers)."""
    with open(path, "a") as fh:
        for r, a, s in list(zip(rows, answers, scores.tolist()))[:n]:
            prompt = tokenizer.decode(r["prompt_ids"], skip_special_tokens=True)
            answer = tokenizer.decode(a, skip_special_tokens=True)
            fh.write(json.dumps({"step": step, "prompt": prompt, "answer": answer, "reward": s}) + "\n")
            print(f"step {step} sample (reward {s:+.3f}): {prompt.strip()!r} -> {answer.strip()!r}")
