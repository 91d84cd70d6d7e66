"""Stage 3, PPO: RLHF of the SFT model against the reward model.

    python -m runner step=ppo step.actor_from=outputs/sft/<run>/export step.critic_from=outputs/reward/<run>/export

Four DeepSpeed engines: the actor (trained, from the SFT export) and its frozen copy the reference, the critic
(trained, from the reward export) and the frozen reward model. One step:

1. rollout: step.generation_batches batches of step.generation_batch_size prompts per rank; the actor samples an
   answer to each (transformers generate; under ZeRO-3 all ranks generate in lockstep);
2. experience: every prompt+answer, right-padded to the batch's longest, gets the actor's and the reference's
   log-probs of the answer tokens, the critic's values and the reward model's score at the last token;
3. rewards -kl_coef * (log pi - log pi_ref) per token, plus the clipped score on the last one; GAE advantages;
4. step.ppo_epochs passes over the experience in chunks of train.micro_batch_size: clipped policy loss (+ the
   pretraining-loss mixture) -> actor step; clipped value loss -> critic step; then the EMA of the actor.

Evaluation (step 0 = the SFT policy, every train.eval_every steps, the end): mean reward-model score of answers to
the eval prompts, sampled with a fixed seed, so the gain over the SFT policy is measured on the same draws.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from runner import checkpoint, data, engine as eng, loop, modeling, rl
from runner.engine import Dist
from runner.metrics import Metrics

EVAL_SEED = 99991


def run(cfg: DictConfig, ds_config: dict, run_dir: Path, dist: Dist) -> None:
    step_cfg, train_cfg, rt = cfg.step, cfg.train, cfg.runtime
    eng.seed_everything(int(cfg.seed))  # the same on every rank while models are built
    tokenizer = modeling.load_tokenizer(cfg.model)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    prompts = data.load_prepared(rt.data.paths.train)
    eval_prompts = data.load_prepared(rt.data.paths.eval)
    configs = {"actor": ds_config, **{name: json.loads((run_dir / f"ds_config.{name}.json").read_text())
                                      for name in ("critic", "reference", "reward")}}
    dtype = cfg.precision.dtype

    # ------------------------------------------------------------------------------------------ the four engines
    actor = eng.initialize(
        modeling.load_causal_lm(cfg.model, configs["actor"], dtype, train_cfg.gradient_checkpointing, cfg.lora,
                                cfg.lora.r), cfg.optimizer, configs["actor"])
    reference = eng.initialize_frozen(modeling.load_causal_lm(cfg.model, configs["reference"], dtype),
                                      configs["reference"])
    critic_source = OmegaConf.create({"path": step_cfg.critic_from, "dropout": cfg.model.dropout})
    critic_optimizer = OmegaConf.merge(cfg.optimizer, {"lr": step_cfg.critic.lr,
                                                       "weight_decay": step_cfg.critic.weight_decay})
    critic = eng.initialize(
        modeling.load_scalar_model(critic_source, configs["critic"], dtype, pad, step_cfg.critic.gradient_checkpointing,
                                   cfg.lora, step_cfg.critic.lora_r), critic_optimizer, configs["critic"])
    reward_source = OmegaConf.create({"path": step_cfg.reward_from, "dropout": None})
    reward = eng.initialize_frozen(modeling.load_scalar_model(reward_source, configs["reward"], dtype, pad),
                                   configs["reward"])
    hybrid = _hybrid_engine_status(actor, step_cfg, dist)
    ema = EMA(actor, float(step_cfg.ema.beta), dist) if step_cfg.ema.enabled else None
    unsupervised = data.load_prepared(rt.unsupervised.path) if rt.get("unsupervised") else None

    gen_config = _generation_config(step_cfg.generation, pad, eos)
    synced = actor.zero_optimization_partition_weights() and dist.world > 1  # ZeRO-3: every rank runs every forward
    kl = rl.KLController(step_cfg.kl.type, step_cfg.kl.coef, step_cfg.kl.target, step_cfg.kl.horizon)
    moments = rl.RunningMoments()
    gen_bs, micro = int(step_cfg.generation_batch_size), int(train_cfg.micro_batch_size)
    total_steps = int(rt.total_steps)

    # ------------------------------------------------------------------------------------------ rollout
    def generate(rows: list[dict], config) -> list[list[int]]:
        """Answers (token ids, up to and including eos) to left-padded prompts."""
        ids, mask = _left_pad([r["prompt_ids"] for r in rows], pad)
        actor.eval()
        with torch.no_grad():
            out = actor.module.generate(input_ids=ids.to(dist.device), attention_mask=mask.to(dist.device),
                                        generation_config=config, synced_gpus=synced)
        actor.train()
        answers = []
        for row in out[:, ids.size(1):].tolist():
            answers.append(row[:row.index(eos) + 1] if eos in row else row)
        return answers

    def experience(rows: list[dict], answers: list[list[int]]) -> dict[str, torch.Tensor]:
        """Prompt+answer right-padded; the answer tokens' log-probs under actor and reference, values, scores."""
        ids, mask = data._pad([r["prompt_ids"] + a for r, a in zip(rows, answers)], pad)
        action = torch.zeros(ids.size(0), ids.size(1) - 1)
        for i, (r, a) in enumerate(zip(rows, answers)):
            start = len(r["prompt_ids"]) - 1  # position t scores token t+1: the first answer token is scored at p-1
            action[i, start:start + len(a)] = 1.0
        ids, mask, action = ids.to(dist.device), mask.to(dist.device), action.to(dist.device)
        actor.eval()
        with torch.no_grad():
            logits = actor(input_ids=ids, attention_mask=mask).logits
            logprobs = rl.logprobs_of(logits, ids)
            entropy = rl.masked_mean(rl.entropy_of(logits), action)
            del logits
            ref_logprobs = rl.logprobs_of(reference(input_ids=ids, attention_mask=mask).logits, ids)
            values = critic(ids, mask)[:, :-1]
            scores = modeling.last_token_scores(reward(ids, mask), mask)
        actor.train()
        return {"input_ids": ids, "attention_mask": mask, "action_mask": action, "logprobs": logprobs,
                "ref_logprobs": ref_logprobs, "values": values, "scores": scores, "entropy": entropy.reshape(1)}

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluate() -> dict:
        """Mean reward-model score (and KL to the reference, answer length) of answers to the eval prompts, sampled
        with a fixed seed: every evaluation draws the same random numbers, so values are comparable over steps."""
        batches = data.eval_batches(len(eval_prompts), gen_bs, dist.world, dist.rank)
        if train_cfg.eval_max_batches:
            batches = batches[:int(train_cfg.eval_max_batches)]
        longest = max(eng.gather_objects(len(batches), dist.world))
        sums = torch.zeros(5, dtype=torch.float64)
        devices = [dist.device] if dist.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(EVAL_SEED + dist.rank)
            for i in range(longest):  # ranks with fewer batches repeat one (discarded): ZeRO-3 runs in lockstep
                idx = batches[i] if i < len(batches) else (batches[0] if batches else [0])
                rows = [eval_prompts[j] for j in idx]
                exp = experience(rows, generate(rows, gen_config))
                if i < len(batches):
                    per_answer_kl = ((exp["logprobs"] - exp["ref_logprobs"]) * exp["action_mask"]).sum(1)
                    s = exp["scores"].double().cpu()
                    sums += torch.tensor([len(s), s.sum(), (s ** 2).sum(), float(per_answer_kl.sum()),
                                          float(exp["action_mask"].sum())], dtype=torch.float64)
        n, total, total_sq, kl_sum, length = eng.all_reduce_sum(sums.tolist(), dist.device)
        mean = total / max(n, 1)
        return {"reward_mean": mean, "reward_std": max(total_sq / max(n, 1) - mean ** 2, 0.0) ** 0.5,
                "kl": kl_sum / max(n, 1), "response_length": length / max(n, 1), "prompts": int(n)}

    # ------------------------------------------------------------------------------------------ state and resume
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "tokens": 0, "kl_coef": kl.value,
             "moments": moments.state(), "eval_initial": None, "lm_batches": 0}
    if cfg.resume:
        state = {**state, **checkpoint.resume(actor, run_dir, dist, others={"critic": critic},
                                              rank_files=("ema",) if ema else ())}
        kl.value = state["kl_coef"]
        moments.load(state["moments"])
        if ema:
            ema.load(state.pop("ema"))
    metrics = Metrics(run_dir, actor, dist, cfg, total_steps, state["step"])
    if dist.main and hybrid:
        metrics.bar.write(hybrid)
    if not cfg.resume:  # (a resumed run continues the random stream its checkpoint saved)
        torch.manual_seed(int(cfg.seed) * 1000 + dist.rank * 7919)  # sampling differs across ranks

    def epoch_batches(epoch: int) -> list[list[int]]:
        return data.train_batches(len(prompts), gen_bs, dist.world, dist.rank, int(cfg.seed), epoch)

    def unsupervised_batches():
        """Pretraining-loss batches, endlessly; a resumed run skips the ones already used."""
        epoch, seen = 0, 0
        while True:
            for idx in data.train_batches(len(unsupervised), micro, dist.world, dist.rank, int(cfg.seed) + 1, epoch):
                seen += 1
                if seen > state["lm_batches"]:
                    state["lm_batches"] = seen
                    yield torch.tensor([unsupervised[j]["input_ids"] for j in idx], device=dist.device)
            epoch += 1

    lm_batches = unsupervised_batches() if unsupervised is not None else None
    if state["eval_initial"] is None:
        state["eval_initial"] = evaluate()  # the SFT policy, before any PPO step
        metrics.log(0, state["eval_initial"], prefix="eval")
    last_eval = state["eval_initial"]
    batches = epoch_batches(state["epoch"])
    started, step = time.time(), state["step"]
    stop_at = int(train_cfg.stop_at_step or total_steps)
    samples_file = run_dir / "samples.jsonl"
    while step < min(total_steps, stop_at):
        step_start = time.perf_counter()
        # 1-2. rollout and experience
        gen_time = exp_time = 0.0
        experiences, first_rows, first_answers = [], None, None
        for _ in range(int(step_cfg.generation_batches)):
            if state["batch_in_epoch"] >= len(batches):
                state["epoch"], state["batch_in_epoch"] = state["epoch"] + 1, 0
                batches = epoch_batches(state["epoch"])
            rows = [prompts[j] for j in batches[state["batch_in_epoch"]]]
            state["batch_in_epoch"] += 1
            t0 = _now(dist)
            answers = generate(rows, gen_config)
            t1 = _now(dist)
            experiences.append(experience(rows, answers))
            exp_time += _now(dist) - t1
            gen_time += t1 - t0
            if first_rows is None:
                first_rows, first_answers = rows, answers
        exp = _concat(experiences, pad)

        # 3. rewards and advantages
        scores = exp["scores"].float()
        count_sum_sq = eng.all_reduce_sum([scores.numel(), float(scores.sum()), float((scores ** 2).sum())],
                                          dist.device)
        if step_cfg.reward_normalization:
            moments.update(int(count_sum_sq[0]), count_sum_sq[1], count_sum_sq[2])
            scores = (scores - moments.mean) / max(moments.std, 1e-6)
        mask = exp["action_mask"]
        rewards = rl.token_rewards(exp["logprobs"], exp["ref_logprobs"], scores, mask, kl.value,
                                   float(step_cfg.clip_reward_value))
        advantages, returns = rl.gae(rewards, exp["values"], mask, float(step_cfg.gamma), float(step_cfg.lam))
        if step_cfg.whiten_advantages:
            advantages = rl.whiten(advantages, mask)
        answer_kl = ((exp["logprobs"] - exp["ref_logprobs"]) * mask).sum(1)

        # 4. PPO epochs over the experience
        t_train = _now(dist)
        n = exp["input_ids"].size(0)
        sums: dict[str, float] = {}
        chunks = 0
        for ppo_epoch in range(int(step_cfg.ppo_epochs)):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(int(cfg.seed) + 31 * step + ppo_epoch))
            for c in range(n // micro):
                idx = order[c * micro:(c + 1) * micro].to(dist.device)
                ids, attn, amask = exp["input_ids"][idx], exp["attention_mask"][idx], mask[idx]
                width = int(attn.sum(1).max())  # trim the chunk's padding columns
                ids, attn, amask = ids[:, :width], attn[:, :width], amask[:, :width - 1]

                logits = actor(input_ids=ids, attention_mask=attn).logits
                logprobs = rl.logprobs_of(logits, ids)
                pg_loss, clip_fraction = rl.policy_loss(logprobs, exp["logprobs"][idx, :width - 1],
                                                        advantages[idx, :width - 1], amask, float(step_cfg.cliprange))
                loss = pg_loss
                if step_cfg.entropy_coef:
                    loss = loss - float(step_cfg.entropy_coef) * rl.masked_mean(rl.entropy_of(logits), amask)
                if lm_batches is not None:
                    lm = next(lm_batches)
                    ptx = actor(input_ids=lm, attention_mask=torch.ones_like(lm), labels=lm).loss
                    loss = loss + float(step_cfg.unsupervised.coef) * ptx
                    _add(sums, ptx_loss=float(ptx.detach()))
                actor.backward(loss)
                actor.step()

                values = critic(ids, attn)[:, :-1]
                v_loss, v_clip = rl.value_loss(values, exp["values"][idx, :width - 1], returns[idx, :width - 1],
                                               amask, float(step_cfg.cliprange_value), float(step_cfg.value_loss_coef))
                critic.backward(v_loss)
                critic.step()
                _add(sums, actor_loss=float(pg_loss.detach()), critic_loss=float(v_loss.detach()),
                     clip_fraction=float(clip_fraction), value_clip_fraction=float(v_clip))
                chunks += 1
        if ema:
            ema.update()
        train_time = _now(dist) - t_train
        step += 1
        state["step"] = step
        metrics.advance()

        # metrics: means over ranks
        n_answers, score_sum, score_sq = count_sum_sq
        local = {k: v / max(chunks, 1) for k, v in sums.items()}
        gen_tokens = float(mask.sum())
        all_tokens = float(exp["attention_mask"].sum())
        keys = sorted(local)
        reduced = eng.all_reduce_sum([local[k] for k in keys] + [
            float(answer_kl.sum()), gen_tokens, all_tokens, float(exp["entropy"].mean()), float(advantages.sum()),
            float(returns.sum()), float((exp["values"] * mask).sum()), gen_time, exp_time, train_time], dist.device)
        means = {k: v / dist.world for k, v in zip(keys, reduced)}
        kl_sum, gen_tokens, all_tokens, entropy, adv_sum, ret_sum, val_sum, g_t, e_t, t_t = reduced[len(keys):]
        mean_kl = kl_sum / max(n_answers, 1)
        kl.update(mean_kl, int(n_answers))
        state["kl_coef"], state["moments"] = kl.value, moments.state()
        step_time = time.perf_counter() - step_start
        state["tokens"] += int(all_tokens)
        reward_mean = score_sum / max(n_answers, 1)
        values = {"reward_mean": reward_mean, "reward_std": max(score_sq / max(n_answers, 1) - reward_mean ** 2,
                                                                0.0) ** 0.5,
                  "kl": mean_kl, "kl_coef": kl.value, "entropy": entropy / dist.world, **means,
                  "response_length": gen_tokens / max(n_answers, 1), "advantage_mean": adv_sum / max(gen_tokens, 1),
                  "return_mean": ret_sum / max(gen_tokens, 1), "value_mean": val_sum / max(gen_tokens, 1),
                  "actor_lr": actor.get_lr()[0], "critic_lr": critic.get_lr()[0],
                  "gen_time_s": g_t / dist.world, "experience_time_s": e_t / dist.world,
                  "train_time_s": t_t / dist.world, "step_time_s": step_time,
                  "gen_tokens_per_s": gen_tokens / max(g_t / dist.world, 1e-9),
                  "tokens_per_s": all_tokens / max(step_time, 1e-9), "epoch": state["epoch"],
                  "peak_memory_mb": eng.gather_objects(round(eng.peak_memory_mb(dist.device), 1), dist.world)}
        if step % int(train_cfg.log_every) == 0 or step in (total_steps, stop_at):
            metrics.log(step, values)
        every = int(step_cfg.print_answers_every or 0)
        if dist.main and every and (step % every == 0 or step == 1):
            _log_samples(samples_file, metrics, step, tokenizer, first_rows, first_answers, exp["scores"])

        eval_every = int(train_cfg.eval_every)
        if (eval_every and step % eval_every == 0) or step == total_steps:
            last_eval = evaluate()
            metrics.log(step, last_eval, prefix="eval")
        save_every = int(train_cfg.save_every)
        if (save_every and step % save_every == 0) or step in (total_steps, stop_at):
            checkpoint.save(actor, run_dir, step, state, int(train_cfg.keep_last), dist, others={"critic": critic},
                            rank_files={"ema": ema.shadow} if ema else None)

    if step < total_steps:
        metrics.close(None)
        if dist.main:
            print(f"stopped at step {step} of {total_steps} (train.stop_at_step); continue with "
                  f"`python -m runner resume={run_dir} train.stop_at_step=null`")
        return

    # ------------------------------------------------------------------------------------------ exports and summary
    exports = {}
    if train_cfg.export:
        info = {"stage": "ppo", "run_dir": str(run_dir), "actor_from": step_cfg.actor_from,
                "critic_from": step_cfg.critic_from, "reward_from": step_cfg.reward_from}
        exports["export_dir"] = checkpoint.export_hf(actor, tokenizer, run_dir / "export", dist,
                                                     {"kind": "causal_lm", **info}, cfg.lora, cfg.lora.r)
        exports["critic_export_dir"] = checkpoint.export_hf(critic, tokenizer, run_dir / "export_critic", dist, {
            "kind": "critic", **info,
            "load": "transformers.AutoModelForSequenceClassification.from_pretrained(this directory)"},
            cfg.lora, step_cfg.critic.lora_r)
        if ema:
            exports["ema_export_dir"] = checkpoint.export_hf(actor, tokenizer, run_dir / "export_ema", dist, {
                "kind": "causal_lm", "ema_beta": float(step_cfg.ema.beta), **info}, cfg.lora, cfg.lora.r,
                state=ema.full_state(checkpoint.full_state_dict(actor)))
    train_rewards = loop._read(run_dir, "train/reward_mean") if dist.main else []
    initial, final = state["eval_initial"], last_eval
    summary = {"stage": "ppo", "steps": step, "world_size": dist.world, "wall_time_s": time.time() - started,
               "eval_reward_initial": initial["reward_mean"], "eval_reward_final": final["reward_mean"],
               "eval_reward_gain": final["reward_mean"] - initial["reward_mean"],
               **{f"eval_{k}": v for k, v in final.items()},
               "eval_prompts_note": "eval split prompts (never trained on); initial = the SFT policy before PPO",
               "train_reward_first": train_rewards[0] if train_rewards else None,
               "train_reward_last": train_rewards[-1] if train_rewards else None,
               "kl_coef_final": kl.value, "hybrid_engine": hybrid, "tokens_trained": state["tokens"],
               "objective": final["reward_mean"], "objective_name": "reward_mean",
               "peak_memory_mb": eng.gather_objects(round(eng.peak_memory_mb(dist.device), 1), dist.world),
               "data": OmegaConf.to_container(rt.data.stats) if rt.data else None,
               "zero_partitioned_numel": {"actor": loop._local_partition_numel(actor, dist),
                                          "critic": loop._local_partition_numel(critic, dist)},
               **{k: str(v) for k, v in exports.items()}}
    metrics.close(summary)


# ---------------------------------------------------------------------------------------------- helpers
def _now(dist: Dist) -> float:
    if dist.device.type == "cuda":
        torch.cuda.synchronize(dist.device)
    return time.perf_counter()


def _add(sums: dict, **values: float) -> None:
    for k, v in values.items():
        sums[k] = sums.get(k, 0.0) + v


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, longest - len(s):] = torch.tensor(s)
        mask[i, longest - len(s):] = 1
    return ids, mask


def _concat(batches: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Experience batches of different lengths -> one, right-padded to the longest."""
    if len(batches) == 1:
        return batches[0]
    width = max(b["input_ids"].size(1) for b in batches)
    out = {}
    for key in batches[0]:
        parts = []
        for b in batches:
            t = b[key]
            if t.dim() == 2:
                fill = pad_id if key == "input_ids" else 0
                target = width if t.size(1) == b["input_ids"].size(1) else width - 1
                t = torch.nn.functional.pad(t, (0, target - t.size(1)), value=fill)
            parts.append(t)
        out[key] = torch.cat(parts)
    return out


def _generation_config(gen: DictConfig, pad: int, eos: int):
    from transformers import GenerationConfig

    kwargs = {"max_new_tokens": int(gen.max_new_tokens), "do_sample": bool(gen.do_sample), "pad_token_id": pad,
              "eos_token_id": eos, "use_cache": True, "repetition_penalty": float(gen.repetition_penalty)}
    if gen.do_sample:
        kwargs.update(temperature=float(gen.temperature), top_k=int(gen.top_k) or None, top_p=float(gen.top_p))
    return GenerationConfig(**kwargs)


def _hybrid_engine_status(actor, step_cfg: DictConfig, dist: Dist) -> str | None:
    if not step_cfg.hybrid_engine.enabled:
        return None
    import deepspeed

    if len(getattr(actor, "_inference_containers", [])) > 0:
        return "hybrid engine: active (DeepSpeed's inference kernels generate the rollouts)"
    return (f"hybrid engine: requested, but DeepSpeed {deepspeed.__version__} has no inference policy for "
            f"{type(actor.module).__name__}, so it cannot be applied: rollouts use the model's own generate() "
            "(same results, no speed-up)")


def _log_samples(path: Path, metrics: Metrics, step: int, tokenizer, rows, answers, scores) -> None:
    with open(path, "a") as fh:
        for r, a, s in list(zip(rows, answers, scores.tolist()))[:2]:
            prompt = tokenizer.decode(r["prompt_ids"], skip_special_tokens=True)
            answer = tokenizer.decode(a, skip_special_tokens=True)
            fh.write(json.dumps({"step": step, "prompt": prompt, "answer": answer, "reward": s}) + "\n")
            metrics.bar.write(f"step {step} sample (reward {s:+.3f}): {prompt.strip()!r} -> {answer.strip()!r}")


class EMA:
    """An exponential moving average of the actor's weights, ema = beta * ema + (1 - beta) * w after every step.
    Each rank keeps the average of what it holds: its partition under ZeRO-3, the whole model otherwise."""

    def __init__(self, engine, beta: float, dist: Dist):
        self.beta, self.dist = beta, dist
        self.zero3 = engine.zero_optimization_partition_weights()
        self.params = list(engine.module.named_parameters(remove_duplicate=False))
        self.shadow = [self._local(p).detach().float().clone() for _, p in self._unique()]

    def _unique(self):
        seen = set()
        for name, p in self.params:
            if id(p) not in seen:
                seen.add(id(p))
                yield name, p

    def _local(self, p: torch.Tensor) -> torch.Tensor:
        return p.ds_tensor if self.zero3 else p.data

    @torch.no_grad()
    def update(self) -> None:
        for s, (_, p) in zip(self.shadow, self._unique()):
            s.mul_(self.beta).add_(self._local(p).detach().float(), alpha=1.0 - self.beta)

    def load(self, shadow: list[torch.Tensor]) -> None:
        for s, saved in zip(self.shadow, shadow):
            s.copy_(saved)

    def full_state(self, base: dict | None) -> dict | None:
        """`base` (the actor's full state dict on rank 0) with every parameter replaced by its average (collective
        under ZeRO-3: the partitions are gathered)."""
        import deepspeed.comm as dist_comm

        averaged = {}
        for s, (_, p) in zip(self.shadow, self._unique()):
            if self.zero3:
                local = s.to(self.dist.device)
                parts = [torch.empty_like(local) for _ in range(self.dist.world)]
                dist_comm.all_gather(parts, local)
                full = torch.cat(parts)[:p.ds_numel].view(p.ds_shape)
            else:
                full = s
            averaged[id(p)] = full
        if base is None:
            return None
        for name, p in self.params:
            if name in base:
                base[name] = averaged[id(p)].to(base[name].dtype).cpu()
        return base
