"""Self-feedback SFT on the ranks. The policy's engine and the judge (the `reward` group: functions and reward
models); no reference, no critic. The run is step.rounds rounds of step.steps_per_round optimizer steps; a round:

1. generate: step.prompts_per_round prompts per rank (the SFT rows' prompts), step.candidates answers each, sampled
   by the current policy (ZeRO-3: all ranks in lockstep) and scored by the judge;
2. select: each prompt's best answer, kept by step.accept.rule (best: always; threshold: its score reaches
   step.accept.threshold; beat_reference: it beats the judge's score of the row's own response); the round's answers
   go to round_<k>/generated.jsonl (every candidate, its score, whether it was kept);
3. train: each micro-batch holds train.micro_batch_size SFT rows and as many kept answers (this rank's, cycled), one
   forward pass; the loss is alpha x L_data + (1 - alpha) x L_gen, each the mean NLL of its answer tokens (alpha of
   this round, step.alpha; L_data alone while a rank kept nothing).

Evaluation (step 0 = the starting policy, after every round): the judge's mean score of answers to the eval prompts
(fixed seed), the objective. Resume continues in the middle of a round (each rank's kept answers are in its rank
state).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from runner import modeling, rewards
from runner.data import batches
from runner.data.prepare import load_prepared
from runner.stages.self_feedback.spec import alphas
from runner.train import checkpoint, engine as eng, loop, models, onpolicy, rollout
from runner.train.engine import Dist


def run(cfg: DictConfig, run_dir: Path, dist: Dist) -> None:
    loop.run(SelfFeedbackTask(cfg, run_dir, dist), cfg, run_dir, dist)


class SelfFeedbackTask:
    name, objective, headline, best, best_mode = "self_feedback", "reward_mean", "loss", None, "max"
    evaluate_first = True  # the starting policy's held-out reward (eval_reward_initial)

    def __init__(self, cfg: DictConfig, run_dir: Path, dist: Dist):
        self.cfg, self.step_cfg, self.run_dir, self.dist = cfg, cfg.step, run_dir, dist
        step = cfg.step
        eng.seed_everything(int(cfg.seed))
        self.tokenizer = tok = modeling.load_tokenizer(cfg.model)
        self.pad, self.eos = tok.pad_token_id, tok.eos_token_id
        self.rows = load_prepared(cfg.runtime.data.paths.train)
        self.eval_prompts = onpolicy.Prompts(load_prepared(cfg.runtime.data.paths.eval))

        ds = eng.ds_config(run_dir)
        net = models.load_causal_lm(
            cfg.model, ds, cfg.precision.dtype, cfg.train.gradient_checkpointing, cfg.lora, cfg.lora.r
        )
        self.policy = eng.initialize(net, cfg.optimizer, ds)
        self.engines = {"policy": self.policy}
        self.judge = rollout.make_judge(cfg, run_dir, tok, self.pad)
        self.gen_config = rollout.generation_config(step.generation, self.pad, self.eos)
        self.synced = self.policy.zero_optimization_partition_weights() and dist.world > 1  # ZeRO-3: lockstep
        self.positions = models.positions(self.policy.module)

        self.micro, self.gas = int(cfg.train.micro_batch_size), int(cfg.train.gradient_accumulation_steps)
        self.per_round, self.alphas = int(step.steps_per_round), alphas(cfg)
        self.collate = batches.CausalLMCollator(self.pad)
        self.data = batches.Cursor(len(self.rows), self.micro, dist.world, dist.rank, int(cfg.seed))
        self.prompts = batches.Cursor(
            len(self.rows), int(step.prompts_per_round), dist.world, dist.rank, int(cfg.seed) + 1
        )
        self.kept: list[dict] = []  # this rank's kept answers of the current round: {"input_ids", "prompt_len"}
        self.kept_position, self.history, self.tokens = 0, [], 0  # history: each round's stats, the last current
        if not cfg.resume:  # (a resumed run continues the random stream its checkpoint saved)
            torch.manual_seed(int(cfg.seed) * 1000 + dist.rank * 7919)  # sampling differs across ranks

    # ------------------------------------------------------------------------------------ 1-2. generate, select
    def new_round(self, k: int) -> dict:
        """Generate, score and select this round's answers; write round_<k>/generated.jsonl; the round's stats."""
        step, dist, n = self.step_cfg, self.dist, int(self.step_cfg.candidates)
        start = time.perf_counter()
        rows = [self.rows[i] for i in self.prompts.next()]
        rows = [r for r in rows if r["prompt_len"] <= int(step.max_prompt_len)]  # (too long to generate for)
        records, kept, best_scores, all_scores = [], [], [], []
        chunk = int(step.prompts_per_generation)
        filler = {**self.rows[0], "prompt_len": min(self.rows[0]["prompt_len"], int(step.max_prompt_len))}
        for c in range(0, int(step.prompts_per_round), chunk):  # as many generation batches on every rank (ZeRO-3)
            real = rows[c : c + chunk]
            part = real or [filler]  # (a rank whose prompts ran out generates once more, for nothing)
            prompts = [r["input_ids"][: r["prompt_len"]] for r in part for _ in range(n)]
            config = rollout.capped(self.gen_config, self.positions, max(len(p) for p in prompts))
            answers = rollout.generate(self.policy, prompts, config, self.pad, self.eos, dist.device, self.synced)
            scores = self.score(prompts, answers, [r for r in part for _ in range(n)]).view(len(part), n)
            if step.accept.rule == "beat_reference":
                own = [r["input_ids"][r["prompt_len"] :] for r in part]
                reference = self.score([r["input_ids"][: r["prompt_len"]] for r in part], own, part)
            for i, row in enumerate(real):
                best = int(scores[i].argmax())
                value = float(scores[i, best])
                accept = {
                    "best": True,
                    "threshold": step.accept.threshold is not None and value >= float(step.accept.threshold),
                    "beat_reference": step.accept.rule == "beat_reference" and value > float(reference[i]),
                }[str(step.accept.rule)]
                answer = answers[i * n + best]
                if accept and answer:
                    prompt = row["input_ids"][: row["prompt_len"]]
                    kept.append({"input_ids": prompt + answer, "prompt_len": len(prompt)})
                best_scores.append(value)
                all_scores += scores[i].tolist()
                records.append(self.record(k, row, answers[i * n : (i + 1) * n], scores[i].tolist(), best, accept))
        self.kept, self.kept_position = kept, 0
        gathered = eng.gather_objects(records, dist.world)
        if dist.main:
            out = self.run_dir / f"round_{k}"
            out.mkdir(exist_ok=True)
            with open(out / "generated.jsonl", "w") as fh:
                for rank_records in gathered:
                    for r in rank_records:
                        fh.write(json.dumps(r) + "\n")
        total, kept_n, best_sum, all_sum, n_all = eng.all_reduce_sum(
            [float(len(best_scores)), float(len(kept)), sum(best_scores), sum(all_scores), float(len(all_scores))],
            dist.device,
        )
        return {
            "round": k,
            "candidates": n_all,
            "acceptance_rate": kept_n / max(total, 1),
            "best_score_mean": best_sum / max(total, 1),
            "candidate_score_mean": all_sum / max(n_all, 1),
            "mixture_generated": kept_n,  # kept answers (all ranks), cycled by L_gen this round
            "mixture_data": len(self.rows),  # the SFT rows L_data reads
            "round_time_s": time.perf_counter() - start,
        }

    def score(self, prompts: list[list[int]], answers: list[list[int]], rows: list[dict]) -> torch.Tensor:
        ids, mask = batches.pad([p + a for p, a in zip(prompts, answers)], self.pad)
        extras = [json.loads(r.get("extra") or "{}") for r in rows]
        scores, _ = self.judge(ids.to(self.dist.device), mask.to(self.dist.device), [len(p) for p in prompts], extras)
        return scores.float().cpu()

    def record(self, k: int, row: dict, answers: list[list[int]], scores: list[float], best: int, kept: bool) -> dict:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        return {
            "round": k,
            "rank": self.dist.rank,
            "prompt": decode(row["input_ids"][: row["prompt_len"]]),
            "reference": decode(row["input_ids"][row["prompt_len"] :]),
            "candidates": [{"answer": decode(a), "score": s} for a, s in zip(answers, scores)],
            "best": best,
            "kept": kept,
        }

    # ------------------------------------------------------------------------------------------------- 3. train
    def train_step(self, step: int, log: bool) -> dict:
        starts = (step - 1) % self.per_round == 0  # a round starts (a resumed one has its answers in rank state)
        if starts:
            self.history.append(self.new_round((step - 1) // self.per_round + 1))
        alpha = self.alphas[(step - 1) // self.per_round]
        start, sums = time.perf_counter(), {"loss": 0.0, "data_loss": 0.0, "gen_loss": 0.0, "gen_batches": 0.0}
        for _ in range(self.gas):
            data_rows = [self.rows[i] for i in self.data.next()]
            gen_rows = [self.next_kept() for _ in range(self.micro)] if self.kept else []
            loss, data_loss, gen_loss, tokens = self.mixture_loss(data_rows, gen_rows, alpha)
            self.policy.backward(loss)
            self.policy.step()
            self.tokens += tokens
            sums["loss"] += float(loss.detach()) / self.gas
            sums["data_loss"] += data_loss / self.gas
            if gen_rows:
                sums["gen_loss"] += gen_loss
                sums["gen_batches"] += 1
        loss, data_loss, gen_loss, gen_batches = eng.all_reduce_sum(list(sums.values()), self.dist.device)
        world = self.dist.world
        out = {"loss": loss / world, "data_loss": data_loss / world, "alpha": alpha, "lr": self.policy.get_lr()[0]}
        if gen_batches:
            out["gen_loss"] = gen_loss / gen_batches
        out.update(self.history[-1] if starts else {"round": self.history[-1]["round"]})
        out["step_time_s"] = time.perf_counter() - start
        return out

    def next_kept(self) -> dict:
        row = self.kept[self.kept_position % len(self.kept)]
        self.kept_position += 1
        return row

    def mixture_loss(self, data_rows: list[dict], gen_rows: list[dict], alpha: float):
        """alpha x L_data + (1 - alpha) x L_gen in one forward pass (L_data alone without kept answers)."""
        batch = {k: v.to(self.dist.device) for k, v in self.collate(data_rows + gen_rows).items()}
        logits = self.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels, ignore_index=batches.IGNORE, reduction="none"
        )
        mask = (labels != batches.IGNORE).float()
        d = len(data_rows)
        data_loss = (nll[:d] * mask[:d]).sum() / mask[:d].sum().clamp(min=1)
        if not gen_rows:
            return data_loss, float(data_loss.detach()), 0.0, int(mask.sum())
        gen_loss = (nll[d:] * mask[d:]).sum() / mask[d:].sum().clamp(min=1)
        loss = alpha * data_loss + (1 - alpha) * gen_loss
        return loss, float(data_loss.detach()), float(gen_loss.detach()), int(mask.sum())

    # ------------------------------------------------------------------------------------------ evaluation, exports
    def evaluate(self) -> dict:
        return onpolicy.judged_heldout(
            self.policy, self.eval_prompts, self.judge, self.cfg, self.dist, self.pad, self.eos
        )

    def export(self, run_dir: Path) -> dict[str, Path]:
        info = {"kind": "causal_lm", "stage": "self_feedback", "rounds": int(self.step_cfg.rounds)}
        return checkpoint.export_model(self.policy, self.tokenizer, run_dir, self.dist, self.cfg, info)

    def state_dict(self) -> dict:
        return {
            "data": self.data.state_dict(),
            "prompts": self.prompts.state_dict(),
            "history": self.history,
            "tokens": self.tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        self.data.load_state_dict(state["data"])
        self.prompts.load_state_dict(state["prompts"])
        self.history, self.tokens = state["history"], state["tokens"]

    def rank_state_dict(self) -> dict:
        return {"kept": self.kept, "kept_position": self.kept_position}

    def load_rank_state_dict(self, state: dict) -> None:
        self.kept, self.kept_position = state["kept"], state["kept_position"]

    def reset_interval(self) -> None:
        pass

    def summary(self) -> dict:
        return {
            "rounds": self.history,
            "tokens_trained": self.tokens,
            "eval_prompts_note": "eval split prompts (never trained on); initial = the policy before training",
            "eval_judge": rewards.describe(self.cfg.reward),
        }

    def notes(self) -> list[str]:
        return []
