"""Critic-free online RL on the ranks (GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++). The policy's engine, the frozen
reference (none when step.kl.placement=none; the policy with its LoRA adapters off when lora.r > 0) and the judge
(the `reward` group: functions and reward models). No critic. One step:

1. rollout: step.rollout.prompts prompts per rank, each repeated step.rollout.n times in one generation batch (a
   prompt's answers stay together on its rank); every answer gets the policy's (and the reference's) log-probs of
   its tokens and the judge's score (+ DAPO's overlong penalty); with dynamic sampling, groups whose answers all
   scored the same are set aside and more prompts sampled, up to step.dynamic_sampling.max_batches batches;
2. advantages: the score on the last answer token (with -coef x KL per token when the KL is in the reward), then
   the estimator step.advantage over each prompt's group (REINFORCE++: normalised over every rank's answers);
3. update: step.epochs passes over the answers in chunks of train.micro_batch_size: the clipped surrogate
   (cliprange_low/high, dual_clip) aggregated by step.loss_agg, + coef x the KL estimator when the KL is in the loss.

Evaluation (step 0 = the starting policy, every train.eval_every steps, the end): the judge's mean score of answers
to the eval prompts (fixed seed), each term's mean and the pass rate of the judge's pass_term.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from runner import modeling, rewards, rl
from runner.data import batches
from runner.data.prepare import load_prepared
from runner.rl import advantages as estimators, kl, losses
from runner.rl.experience import Experience
from runner.train import checkpoint, engine as eng, loop, models, onpolicy, rollout
from runner.train.engine import Dist


def run(cfg: DictConfig, run_dir: Path, dist: Dist) -> None:
    loop.run(GRPOTask(cfg, run_dir, dist), cfg, run_dir, dist)


class GRPOTask:
    name, objective, headline, best, best_mode, evaluate_first = "grpo", "reward_mean", "reward_mean", None, "max", True

    def __init__(self, cfg: DictConfig, run_dir: Path, dist: Dist):
        self.cfg, self.step_cfg, self.run_dir, self.dist = cfg, cfg.step, run_dir, dist
        step, dtype = cfg.step, cfg.precision.dtype
        eng.seed_everything(int(cfg.seed))
        self.tokenizer = tok = modeling.load_tokenizer(cfg.model)
        self.pad, self.eos = tok.pad_token_id, tok.eos_token_id
        self.prompts = load_prepared(cfg.runtime.data.paths.train)
        self.eval_prompts = onpolicy.Prompts(load_prepared(cfg.runtime.data.paths.eval))

        # the policy, the reference (a frozen engine, or the policy with its adapters off), the judge
        ds = eng.ds_config(run_dir)
        net = models.load_causal_lm(cfg.model, ds, dtype, cfg.train.gradient_checkpointing, cfg.lora, cfg.lora.r)
        self.actor = eng.initialize(net, cfg.optimizer, ds)
        self.reference = None
        if step.kl.placement != "none" and int(cfg.lora.r):
            self.reference = models.AdaptersOff(self.actor)  # no second copy of the model
        elif step.kl.placement != "none":
            ref_ds = eng.ds_config(run_dir, "reference")
            eng.seed_everything(int(cfg.seed))  # a model built from its architecture starts as the policy did
            self.reference = eng.initialize_frozen(models.load_causal_lm(cfg.model, ref_ds, dtype), ref_ds)
        self.judge = rollout.make_judge(cfg, run_dir, tok, self.pad)
        self.objective = "pass_rate" if self.judge.pass_term else "reward_mean"  # held-out, for sweeps and Optuna
        self.engines = {"actor": self.actor}

        self.gen_config = rollout.generation_config(step.generation, self.pad, self.eos)
        self.synced = self.actor.zero_optimization_partition_weights() and dist.world > 1  # ZeRO-3: lockstep
        # rollouts (generation and the policy's log-probs of the answers) by vLLM, the engine's whole copy or the engine
        self.sampler = rollout.sampler(self.actor, cfg, run_dir, cfg.lora.r)
        self.estimator = estimators.get(str(step.advantage))
        self.n, self.per_rank, self.micro = (
            int(step.rollout.n),
            int(step.rollout.prompts),
            int(cfg.train.micro_batch_size),
        )
        self.cursor = batches.Cursor(len(self.prompts), self.per_rank, dist.world, dist.rank, int(cfg.seed))
        self.tokens, self.groups_seen, self.groups_uninformative, self.times = 0, 0, 0, (0.0, 0.0)
        if not cfg.resume:  # (a resumed run continues the random stream its checkpoint saved)
            torch.manual_seed(int(cfg.seed) * 1000 + dist.rank * 7919)  # sampling differs across ranks

    # ----------------------------------------------------------------------------------------------- 1. rollout
    def sample(self, rows: list[dict], config=None) -> tuple[Experience, list[dict], list[list[int]]]:
        """n answers to each prompt of `rows`, scored: an Experience whose groups number the prompts."""
        repeated = [r for r in rows for _ in range(self.n)]
        prompt_ids = [r["prompt_ids"] for r in repeated]
        t0 = eng.now(self.dist.device)
        answers = rollout.generate(
            self.sampler, prompt_ids, config or self.gen_config, self.pad, self.eos, self.dist.device, self.synced
        )
        t1 = eng.now(self.dist.device)
        extras = [json.loads(r.get("extra") or "{}") for r in repeated]
        score = lambda ids, mask, lens: self.judge(ids, mask, lens, extras)
        exp = rollout.experience(
            prompt_ids, answers, self.pad, self.dist.device, self.sampler, score, reference=self.reference
        )
        exp.groups = torch.arange(len(rows), device=self.dist.device).repeat_interleave(self.n)
        overlong = self.step_cfg.overlong
        if overlong.enabled:  # DAPO's soft punishment of answers near the length limit
            exp.scores = exp.scores + kl.overlong_penalty(
                exp.action_mask.sum(1),
                int(self.step_cfg.generation.max_new_tokens),
                int(overlong.buffer),
                float(overlong.factor),
            ).to(exp.scores.device)
        self.times = (t1 - t0, eng.now(self.dist.device) - t1)  # generation; log-probs and scores
        return exp, repeated, answers

    def collect(self, rows: list[dict] | None = None) -> onpolicy.Rollout:
        """rollout.prompts groups per rank (the first batch's prompts are `rows` when given). With dynamic sampling,
        batches are sampled until that many groups have answers that differ in score (every rank samples as many
        batches as the rank that needs most: ZeRO-3 generates in lockstep); missing ones are filled with
        uninformative groups (advantage 0), so every step trains on the same number of answers."""
        ds, dist = self.step_cfg.dynamic_sampling, self.dist
        parts, first, gen_time, exp_time, seen, informative = [], None, 0.0, 0.0, 0, 0
        for _i in range(int(ds.max_batches) if ds.enabled else 1):
            batch = rows if rows is not None and first is None else [self.prompts[j] for j in self.cursor.next()]
            exp, repeated, answers = self.sample(batch)
            gen_time, exp_time = gen_time + self.times[0], exp_time + self.times[1]
            parts.append(exp)
            first = first or (repeated, answers)
            keep = kl.informative_groups(exp.scores.float(), exp.groups)
            seen, informative = seen + len(batch), informative + int(keep.sum()) // self.n
            more = float(ds.enabled and informative < self.per_rank)
            if not eng.all_reduce_sum([more], dist.device)[0]:
                break
        exp = Experience.concat(parts, self.pad)
        if ds.enabled:
            exp = exp.select(self.first_groups(exp))
        return onpolicy.Rollout(exp, gen_time, exp_time, *first, group_counts=[float(seen), float(seen - informative)])

    def first_groups(self, exp: Experience) -> torch.Tensor:
        """(B,) the answers of the first rollout.prompts groups, informative ones first."""
        keep = kl.informative_groups(exp.scores.float(), exp.groups)
        order = torch.unique(exp.groups).tolist()
        good = [g for g in order if bool(keep[exp.groups == g][0])]
        chosen = (good + [g for g in order if g not in good])[: self.per_rank]
        return torch.isin(exp.groups, torch.tensor(chosen, device=exp.groups.device))

    # ---------------------------------------------------------------------------------------- one step
    def train_step(self, step: int, log: bool) -> dict:
        return self.train(self.generate_experience(), step)

    def generate_experience(self, rows: list[dict] | None = None) -> onpolicy.Rollout:
        """1. rollout and 2. advantages: step.rollout.n answers to each prompt (the next step.rollout.prompts of the
        data on this rank, or `rows`: tokenised prompt rows, e.g. `trainer.prompts[i]`), scored by the judge, with
        their advantages. Every rank calls it (ZeRO-3 generates in lockstep; some estimators normalise over ranks)."""
        started = time.perf_counter()
        got = self.collect(rows)
        got.started, got.score_stats = started, onpolicy.score_sums(got.exp.scores.float(), self.dist.device)
        got.advantages = advantages_of(got.exp, self.estimator, self.step_cfg, self.dist.device)
        return got

    def train(self, got: onpolicy.Rollout, step: int) -> dict:
        """3. update: step.epochs passes over the rollout's answers (the optimizer steps), then the step's metrics,
        means over ranks. `step` (from 1) seeds the shuffle and paces samples.jsonl."""
        step_cfg, dist, exp = self.step_cfg, self.dist, got.exp
        t_train = eng.now(dist.device)
        loss_sums, chunks = self.update(exp, got.advantages, step)
        times = (got.gen_time, got.exp_time, eng.now(dist.device) - t_train)
        elapsed = time.perf_counter() - got.started
        values = onpolicy.step_metrics(
            dist, exp, got.score_stats, loss_sums, chunks, got.advantages, None, times, elapsed
        )
        self.tokens += int(values.pop("tokens"))
        values.pop("answers")
        values.update(self.reward_metrics(exp, got.group_counts), lr=self.actor.get_lr()[0], epoch=self.cursor.epoch)
        every = int(step_cfg.print_answers_every or 0)
        if dist.main and every and (step % every == 0 or step == 1):
            samples = self.run_dir / "samples.jsonl"
            onpolicy.log_samples(samples, self.tokenizer, step, got.rows, got.answers, exp.scores)
        return values

    def reward_metrics(self, exp: Experience, group_counts: list[float]) -> dict:
        """Means over every rank: each judge term's score, the pass rate (the judge's pass_term), and the share of
        sampled groups whose answers all scored the same (they teach nothing)."""
        names = self.judge.names
        terms = exp.term_scores.float().sum(0).tolist() if exp.term_scores is not None else [0.0] * len(names)
        n, seen, flat, *sums = eng.all_reduce_sum([float(exp.size), *group_counts, *terms], self.dist.device)
        self.groups_seen, self.groups_uninformative = (
            self.groups_seen + int(seen),
            self.groups_uninformative + int(flat),
        )
        out = {"zero_variance_groups": flat / max(seen, 1)}
        if len(names) > 1:
            out.update({f"reward_{k}": v / max(n, 1) for k, v in zip(names, sums)})
        if self.judge.pass_term in names:
            out["pass_rate"] = sums[names.index(self.judge.pass_term)] / max(n, 1)
        return out

    def update(self, exp: Experience, advantages: torch.Tensor, step: int) -> tuple[dict, int]:
        step_cfg, n, sums, chunks = self.step_cfg, exp.size, {}, 0
        in_loss, agg, norm = (
            step_cfg.kl.placement == "loss",
            str(step_cfg.loss_agg),
            float(step_cfg.generation.max_new_tokens),
        )
        for epoch in range(int(step_cfg.epochs)):  # a seeded shuffle per step (0-based) and epoch
            seed = int(self.cfg.seed) + 31 * (step - 1) + epoch
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            for c in range(n // self.micro):
                idx = order[c * self.micro : (c + 1) * self.micro].to(self.dist.device)
                chunk = exp.chunk(idx)
                width = chunk.input_ids.size(1) - 1
                logits = self.actor(input_ids=chunk.input_ids, attention_mask=chunk.attention_mask).logits
                logprobs = rl.logprobs_of(logits, chunk.input_ids)
                pg_loss, fractions = losses.clipped_policy_loss(
                    logprobs,
                    chunk.logprobs,
                    advantages[idx, :width],
                    chunk.action_mask,
                    float(step_cfg.cliprange_low),
                    float(step_cfg.cliprange_high),
                    step_cfg.dual_clip,
                    agg,
                    norm,
                )
                loss = pg_loss
                if in_loss:
                    estimate = kl.kl_estimate(logprobs, chunk.ref_logprobs, str(step_cfg.kl.estimator))
                    kl_loss = losses.aggregate(estimate, chunk.action_mask, agg, norm)
                    loss = loss + float(step_cfg.kl.coef) * kl_loss
                    _add(sums, kl_loss=float(kl_loss.detach()))
                self.actor.backward(loss)
                self.actor.step()
                _add(sums, actor_loss=float(pg_loss.detach()), **{k: float(v) for k, v in fractions.items()})
                chunks += 1
        return sums, chunks

    # ------------------------------------------------------------------------------------------ evaluation, exports
    def evaluate(self) -> dict:
        """The judge's mean score (each term's, the pass rate), KL to the reference and answer length on the eval
        prompts (fixed seed)."""
        return onpolicy.judged_heldout(
            self.sampler,
            self.eval_prompts,
            self.judge,
            self.cfg,
            self.dist,
            self.pad,
            self.eos,
            self.reference,  # (in batches of train.micro_batch_size prompts: the same for every step.rollout.n)
        )

    def export(self, run_dir: Path) -> dict[str, Path]:
        step = self.step_cfg
        info = {"kind": "causal_lm", "stage": "grpo", "advantage": str(step.advantage), "kl": str(step.kl.placement)}
        return checkpoint.export_model(self.actor, self.tokenizer, run_dir, self.dist, self.cfg, info)

    def state_dict(self) -> dict:
        return {
            "data": self.cursor.state_dict(),
            "tokens": self.tokens,
            "groups": [self.groups_seen, self.groups_uninformative],
        }

    def load_state_dict(self, state: dict) -> None:
        self.cursor.load_state_dict(state["data"])
        self.tokens = state["tokens"]
        self.groups_seen, self.groups_uninformative = state["groups"]

    def rank_state_dict(self) -> dict:
        return {}

    def load_rank_state_dict(self, state: dict) -> None:
        pass

    def reset_interval(self) -> None:
        pass

    def summary(self) -> dict:
        return {
            "advantage": str(self.step_cfg.advantage),
            "kl_placement": str(self.step_cfg.kl.placement),
            "critic": None,
            "tokens_trained": self.tokens,
            "zero_variance_groups": self.groups_uninformative / max(self.groups_seen, 1),
            "eval_prompts_note": "eval split prompts (never trained on); initial = the policy before training",
            "eval_judge": rewards.describe(self.cfg.reward),
        }

    def notes(self) -> list[str]:
        return []


def advantages_of(exp: Experience, estimator, step_cfg: DictConfig, device) -> torch.Tensor:
    """Per-token advantages of a rollout: the score on each answer's last token (and -coef x (log pi - log pi_ref)
    on every token when the KL is in the reward), then the estimator over each prompt's group; an estimator that
    asks for it is normalised over every rank's answers (so two ranks give what one rank would on the same
    rollouts)."""
    mask = exp.action_mask
    in_reward = step_cfg.kl.placement == "reward"
    coef = float(step_cfg.kl.coef) if in_reward else 0.0
    ref = exp.ref_logprobs if in_reward else exp.logprobs
    token_rewards = rl.token_rewards(exp.logprobs, ref, exp.scores.float(), mask, coef, math.inf)
    adv, _ = estimator.fn(token_rewards, mask, groups=exp.groups, gamma=float(step_cfg.gamma))
    if estimator.whiten:
        total, total_sq, count = eng.all_reduce_sum(
            [float((adv * mask).sum()), float((adv**2 * mask).sum()), float(mask.sum())], device
        )
        mean = total / max(count, 1)
        std = math.sqrt(max(total_sq / max(count, 1) - mean**2, 0.0) + 1e-8)
        adv = (adv - mean) / std * mask
    return adv


def _add(sums: dict, **values: float) -> None:
    for k, v in values.items():
        sums[k] = sums.get(k, 0.0) + v
