"""PPO on the ranks. Four DeepSpeed engines: the actor (trained, from the SFT export) and its frozen copy the
reference, the critic (trained, from the reward export) and the frozen reward model. One step:

1. rollout: step.generation_batches batches of step.generation_batch_size prompts per rank; the actor samples an
   answer to each; every prompt+answer gets the actor's and the reference's log-probs of the answer tokens, the
   critic's values and the reward model's score at the last token (an Experience);
2. rewards: -kl_coef * (log pi - log pi_ref) per token plus the clipped score on the last one; advantages by
   the estimator step.advantage (GAE with the critic's values);
3. update: step.ppo_epochs passes over the experience in chunks of train.micro_batch_size: clipped policy loss
   (+ the pretraining-loss mixture) -> actor step; clipped value loss -> critic step;
4. the EMA of the actor.

Evaluation (step 0 = the SFT policy, every train.eval_every steps, the end): the mean score of answers to the eval
prompts, sampled with a fixed seed, so the gain over the SFT policy is measured on the same draws; the score is the
judge's when the config names one (reward=...: e.g. the tiny task's ground truth), else the reward model's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from runner import modeling, rewards, rl
from runner.data import batches
from runner.data.prepare import load_prepared
from runner.rl import advantages as estimators
from runner.rl.experience import Experience
from runner.train import checkpoint, engine as eng, loop, models, onpolicy, rollout
from runner.train.ema import EMA
from runner.train.engine import Dist


def run(cfg: DictConfig, run_dir: Path, dist: Dist) -> None:
    loop.run(PPOTask(cfg, run_dir, dist), cfg, run_dir, dist)


def role_optimizer(cfg: DictConfig, role: DictConfig) -> DictConfig:
    """The optimizer keys of one trained model: the run's optimizer with the role's lr and weight decay."""
    return OmegaConf.merge(cfg.optimizer, {"lr": role.lr, "weight_decay": role.weight_decay})


class PPOTask:
    name, objective, headline, best, best_mode, evaluate_first = "ppo", "reward_mean", "reward_mean", None, "max", True

    def __init__(self, cfg: DictConfig, run_dir: Path, dist: Dist):
        self.cfg, self.step_cfg, self.run_dir, self.dist = cfg, cfg.step, run_dir, dist
        step_cfg, rt, dtype = cfg.step, cfg.runtime, cfg.precision.dtype
        eng.seed_everything(int(cfg.seed))  # the same on every rank while models are built
        self.tokenizer = tok = modeling.load_tokenizer(cfg.model)
        self.pad, self.eos = tok.pad_token_id, tok.eos_token_id
        self.prompts, self.eval_prompts = load_prepared(rt.data.paths.train), load_prepared(rt.data.paths.eval)

        # the four engines
        ds = {name: eng.ds_config(run_dir, name) for name in ("", "critic", "reference", "reward")}
        actor, critic = step_cfg.actor, step_cfg.critic
        net = models.load_causal_lm(cfg.model, ds[""], dtype, actor.gradient_checkpointing, cfg.lora, actor.lora_r)
        self.actor = eng.initialize(net, role_optimizer(cfg, actor), ds[""])
        self.reference = eng.initialize_frozen(
            models.load_causal_lm(cfg.model, ds["reference"], dtype), ds["reference"]
        )
        source = OmegaConf.create({"path": step_cfg.critic_from, "dropout": cfg.model.dropout})
        net = models.load_scalar_model(
            source, ds["critic"], dtype, self.pad, critic.gradient_checkpointing, cfg.lora, critic.lora_r
        )
        self.critic = eng.initialize(net, role_optimizer(cfg, critic), ds["critic"])
        source = OmegaConf.create({"path": step_cfg.reward_from, "dropout": None})
        self.reward = eng.initialize_frozen(
            models.load_scalar_model(source, ds["reward"], dtype, self.pad), ds["reward"]
        )
        self.judge = rollout.make_judge(cfg, run_dir, tok, self.pad)  # the evaluation's, when reward= names one
        self.engines = {"actor": self.actor, "critic": self.critic}
        self.hybrid = rollout.hybrid_engine_status(self.actor, bool(step_cfg.hybrid_engine.enabled))
        self.ema = EMA(self.actor, float(step_cfg.ema.beta), dist) if step_cfg.ema.enabled else None
        self.unsupervised = load_prepared(rt.unsupervised.path) if rt.get("unsupervised") else None

        # rollout, advantages, stateful pieces
        self.gen_config = rollout.generation_config(step_cfg.generation, self.pad, self.eos)
        self.synced = self.actor.zero_optimization_partition_weights() and dist.world > 1  # ZeRO-3: lockstep
        # rollouts (generation and the actor's log-probs of the answers) by vLLM, the engine's whole copy or the engine
        self.sampler = rollout.sampler(self.actor, cfg, run_dir, actor.lora_r)
        self.estimator = estimators.get(str(step_cfg.advantage))
        self.kl = rl.KLController(step_cfg.kl.type, step_cfg.kl.coef, step_cfg.kl.target, step_cfg.kl.horizon)
        self.moments = rl.RunningMoments()
        self.gen_bs, self.micro = int(step_cfg.generation_batch_size), int(cfg.train.micro_batch_size)
        self.cursor = batches.Cursor(len(self.prompts), self.gen_bs, dist.world, dist.rank, int(cfg.seed))
        self.lm_cursor = None
        if self.unsupervised is not None:
            self.lm_cursor = batches.Cursor(
                len(self.unsupervised), self.micro, dist.world, dist.rank, int(cfg.seed) + 1
            )
        self.tokens = 0
        if not cfg.resume:  # (a resumed run continues the random stream its checkpoint saved)
            torch.manual_seed(int(cfg.seed) * 1000 + dist.rank * 7919)  # sampling differs across ranks

    # ------------------------------------------------------------------------------------------ one PPO step
    def train_step(self, step: int, log: bool) -> dict:
        return self.train(self.generate_experience(), step)

    def generate_experience(self, rows: list[dict] | None = None) -> onpolicy.Rollout:
        """1. rollout and 2. rewards and advantages: step.generation_batches batches of answers (the first to `rows`,
        tokenised prompt rows such as `trainer.prompts[i]`, when given; else the next prompts of the data on this
        rank), scored by the reward model, with KL-penalised token rewards, advantages and returns. Every rank calls
        it (ZeRO-3 generates in lockstep)."""
        step_cfg, dist = self.step_cfg, self.dist
        started, given = time.perf_counter(), iter([rows] if rows is not None else [])
        got = onpolicy.collect(
            int(step_cfg.generation_batches),
            lambda: next(given, None) or self.next_prompts(),
            self.generate,
            self.experience,
            self.pad,
            dist.device,
        )
        exp = got.exp
        scores = exp.scores.float()
        got.started, got.score_stats = started, onpolicy.score_sums(scores, dist.device)
        if step_cfg.reward_normalization:
            self.moments.update(int(got.score_stats[0]), got.score_stats[1], got.score_stats[2])
            scores = (scores - self.moments.mean) / max(self.moments.std, 1e-6)
        mask = exp.action_mask
        rewards = rl.token_rewards(
            exp.logprobs, exp.ref_logprobs, scores, mask, self.kl.value, float(step_cfg.clip_reward_value)
        )
        got.advantages, got.returns = self.estimator.fn(
            rewards, mask, values=exp.values, gamma=float(step_cfg.gamma), lam=float(step_cfg.lam)
        )
        if step_cfg.whiten_advantages:
            got.advantages = rl.whiten(got.advantages, mask)
        return got

    def train(self, got: onpolicy.Rollout, step: int) -> dict:
        """3. update: step.ppo_epochs passes over the rollout, actor then critic per chunk; 4. the EMA of the actor;
        then the step's metrics (means over ranks) and the adaptive KL coefficient's update. `step` (from 1) seeds
        the shuffle and paces samples.jsonl."""
        step_cfg, dist, exp = self.step_cfg, self.dist, got.exp
        t_train = eng.now(dist.device)
        losses, chunks = self.update(exp, got.advantages, got.returns, step)
        if self.ema:
            self.ema.update()
        times = (got.gen_time, got.exp_time, eng.now(dist.device) - t_train)

        values = onpolicy.step_metrics(
            dist,
            exp,
            got.score_stats,
            losses,
            chunks,
            got.advantages,
            got.returns,
            times,
            time.perf_counter() - got.started,
        )
        self.kl.update(values["kl"], int(values.pop("answers")))
        self.tokens += int(values.pop("tokens"))
        values.update(
            kl_coef=self.kl.value,
            actor_lr=self.actor.get_lr()[0],
            critic_lr=self.critic.get_lr()[0],
            epoch=self.cursor.epoch,
        )
        every = int(step_cfg.print_answers_every or 0)
        if dist.main and every and (step % every == 0 or step == 1):
            onpolicy.log_samples(
                self.run_dir / "samples.jsonl", self.tokenizer, step, got.rows, got.answers, exp.scores
            )
        return values

    def next_prompts(self) -> list[dict]:
        return [self.prompts[j] for j in self.cursor.next()]

    def generate(self, rows: list[dict], config=None) -> list[list[int]]:
        prompts = [r["prompt_ids"] for r in rows]
        return rollout.generate(
            self.sampler, prompts, config or self.gen_config, self.pad, self.eos, self.dist.device, self.synced
        )

    def experience(self, rows: list[dict], answers: list[list[int]], judged: bool = False) -> Experience:
        if judged:
            extras = [json.loads(r.get("extra", "{}")) for r in rows]
            score = lambda ids, mask, prompt_lens: self.judge(ids, mask, prompt_lens, extras)[0]
        else:
            score = lambda ids, mask, prompt_lens: models.last_token_scores(self.reward(ids, mask), mask)
        return rollout.experience(
            [r["prompt_ids"] for r in rows],
            answers,
            self.pad,
            self.dist.device,
            self.sampler,
            score,
            reference=self.reference,
            critic=self.critic,
        )

    def update(self, exp: Experience, advantages: torch.Tensor, returns: torch.Tensor, step: int) -> tuple[dict, int]:
        step_cfg, n, losses, chunks = self.step_cfg, exp.size, {}, 0
        for ppo_epoch in range(int(step_cfg.ppo_epochs)):  # a seeded shuffle per step (0-based) and epoch
            seed = int(self.cfg.seed) + 31 * (step - 1) + ppo_epoch
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            for c in range(n // self.micro):
                idx = order[c * self.micro : (c + 1) * self.micro].to(self.dist.device)
                chunk = exp.chunk(idx)
                width = chunk.input_ids.size(1) - 1
                adv, ret = advantages[idx, :width], returns[idx, :width]

                logits = self.actor(input_ids=chunk.input_ids, attention_mask=chunk.attention_mask).logits
                logprobs = rl.logprobs_of(logits, chunk.input_ids)
                pg_loss, clip_fraction = rl.policy_loss(
                    logprobs, chunk.logprobs, adv, chunk.action_mask, float(step_cfg.cliprange)
                )
                loss = pg_loss
                if step_cfg.entropy_coef:
                    entropy = rl.masked_mean(rl.entropy_of(logits), chunk.action_mask)
                    loss = loss - float(step_cfg.entropy_coef) * entropy
                if self.lm_cursor is not None:
                    ptx = self.pretraining_loss()
                    loss = loss + float(step_cfg.unsupervised.coef) * ptx
                    _add(losses, ptx_loss=float(ptx.detach()))
                self.actor.backward(loss)
                self.actor.step()

                values = self.critic(chunk.input_ids, chunk.attention_mask)[:, :-1]
                v_loss, v_clip = rl.value_loss(
                    values,
                    chunk.values,
                    ret,
                    chunk.action_mask,
                    float(step_cfg.cliprange_value),
                    float(step_cfg.value_loss_coef),
                )
                self.critic.backward(v_loss)
                self.critic.step()
                _add(
                    losses,
                    actor_loss=float(pg_loss.detach()),
                    critic_loss=float(v_loss.detach()),
                    clip_fraction=float(clip_fraction),
                    value_clip_fraction=float(v_clip),
                )
                chunks += 1
        return losses, chunks

    def pretraining_loss(self) -> torch.Tensor:
        """The LM loss of the next block of pretraining text (InstructGPT's PPO-ptx mixture)."""
        lm = torch.tensor([self.unsupervised[j]["input_ids"] for j in self.lm_cursor.next()], device=self.dist.device)
        return self.actor(input_ids=lm, attention_mask=torch.ones_like(lm), labels=lm).loss

    # ------------------------------------------------------------------------------------------ evaluation, exports
    def evaluate(self) -> dict:
        """Mean score (the judge's, else the reward model's), KL to the reference and answer length on the eval
        prompts (fixed seed)."""
        max_batches = int(self.cfg.train.eval_max_batches or 0) or None
        return onpolicy.heldout(
            self.eval_prompts,
            self.gen_bs,
            max_batches,
            self.dist,
            lambda rows: self.experience(rows, self.generate(rows), judged=bool(self.judge)),
        )

    def export(self, run_dir: Path) -> dict[str, Path]:
        cfg, step_cfg, dist, tok = self.cfg, self.step_cfg, self.dist, self.tokenizer
        info = {
            "stage": "ppo",
            "run_dir": str(run_dir),
            "actor_from": step_cfg.actor_from,
            "critic_from": step_cfg.critic_from,
            "reward_from": step_cfg.reward_from,
        }
        actor_r, critic_r = step_cfg.actor.lora_r, step_cfg.critic.lora_r
        critic_info = {
            "kind": "critic",
            **info,
            "load": "transformers.AutoModelForSequenceClassification.from_pretrained(this directory)",
        }
        out = {
            "export_dir": checkpoint.export_hf(
                self.actor, tok, run_dir / "export", dist, {"kind": "causal_lm", **info}, cfg.lora, actor_r
            ),
            "critic_export_dir": checkpoint.export_hf(
                self.critic, tok, run_dir / "export_critic", dist, critic_info, cfg.lora, critic_r
            ),
        }
        if self.ema:
            state = self.ema.full_state(checkpoint.full_state_dict(self.actor))
            out["ema_export_dir"] = checkpoint.export_hf(
                self.actor,
                tok,
                run_dir / "export_ema",
                dist,
                {"kind": "causal_lm", "ema_beta": float(step_cfg.ema.beta), **info},
                cfg.lora,
                actor_r,
                state=state,
            )
        return out

    def state_dict(self) -> dict:
        return {
            "data": self.cursor.state_dict(),
            "kl": self.kl.state_dict(),
            "moments": self.moments.state_dict(),
            "lm_data": self.lm_cursor.state_dict() if self.lm_cursor else None,
            "tokens": self.tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        self.cursor.load_state_dict(state["data"])
        self.kl.load_state_dict(state["kl"])
        self.moments.load_state_dict(state["moments"])
        if self.lm_cursor:
            self.lm_cursor.load_state_dict(state["lm_data"])
        self.tokens = state["tokens"]

    def rank_state_dict(self) -> dict:
        return {"ema": self.ema.state_dict()} if self.ema else {}

    def load_rank_state_dict(self, state: dict) -> None:
        if self.ema:
            self.ema.load_state_dict(state["ema"])

    def reset_interval(self) -> None:
        pass

    def summary(self) -> dict:
        return {
            "kl_coef_final": self.kl.value,
            "hybrid_engine": self.hybrid,
            "tokens_trained": self.tokens,
            "eval_prompts_note": "eval split prompts (never trained on); initial = the SFT policy before PPO",
            "eval_judge": rewards.describe(self.cfg.reward) or f"the reward model {self.step_cfg.reward_from}",
        }

    def notes(self) -> list[str]:
        return [self.hybrid] if self.hybrid else []


def _add(sums: dict, **values: float) -> None:
    for k, v in values.items():
        sums[k] = sums.get(k, 0.0) + v
