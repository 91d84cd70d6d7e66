"""The reward model on the ranks. A batch of B pairs is 2B sequences (chosen first); a sequence's score is the
head's value at its last real token; loss = -log sigmoid(r_chosen - r_rejected - margin). Evaluation: pairwise
accuracy, mean chosen and rejected scores, their margin; the best-accuracy checkpoint is kept as checkpoints/best."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from runner import modeling
from runner.data import batches
from runner.data.prepare import load_prepared
from runner.rl.losses import pairwise_loss
from runner.train import checkpoint, engine as eng, loop, models
from runner.train.engine import Dist


def run(cfg: DictConfig, run_dir: Path, dist: Dist) -> None:
    # 1. data and the model's engine
    eng.seed_everything(int(cfg.seed))
    tokenizer = modeling.load_tokenizer(cfg.model)
    train_set, eval_set = load_prepared(cfg.runtime.data.paths.train), load_prepared(cfg.runtime.data.paths.eval)
    collate = batches.PairCollator(tokenizer.pad_token_id)
    ds_config = eng.ds_config(run_dir)
    model = models.load_scalar_model(
        cfg.model,
        ds_config,
        cfg.precision.dtype,
        tokenizer.pad_token_id,
        cfg.train.gradient_checkpointing,
        cfg.lora,
        cfg.lora.r,
    )
    engine = eng.initialize(model, cfg.optimizer, ds_config)
    margin = float(cfg.step.margin)

    # 2. the loss, the evaluation and the export
    def pair_scores(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        scores = models.last_token_scores(engine(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
        return scores.chunk(2)

    def loss(batch: dict):
        chosen, rejected = pair_scores(batch)
        return pairwise_loss(chosen, rejected, margin).mean(), {
            "accuracy": (chosen > rejected).float().mean(),
            "chosen_score": chosen.mean(),
            "rejected_score": rejected.mean(),
        }

    def sums(batch: dict) -> dict[str, float]:
        chosen, rejected = pair_scores(batch)
        return {
            "pairs": chosen.numel(),
            "correct": float((chosen > rejected).sum()),
            "chosen": float(chosen.sum()),
            "rejected": float(rejected.sum()),
            "loss": float(pairwise_loss(chosen, rejected, margin).sum()),
        }

    def evaluate() -> dict:
        s = loop.evaluate_batches(
            engine, eval_set, collate, int(cfg.train.micro_batch_size), dist, cfg.train.eval_max_batches, sums
        )
        n = max(s["pairs"], 1)
        return {
            "accuracy": s["correct"] / n,
            "chosen_score": s["chosen"] / n,
            "rejected_score": s["rejected"] / n,
            "margin": (s["chosen"] - s["rejected"]) / n,
            "loss": s["loss"] / n,
            "pairs": int(s["pairs"]),
        }

    def export(run_dir: Path) -> dict:
        return checkpoint.export_model(
            engine,
            tokenizer,
            run_dir,
            dist,
            cfg,
            {
                "kind": "reward_model",
                "stage": "reward",
                "load": "transformers.AutoModelForSequenceClassification.from_pretrained(this directory)",
                "score": "the model's value (logits[..., 0] of the score head) at the last non-padding token",
            },
        )

    # 3. the shared loop
    loop.run(
        loop.Supervised(
            "reward",
            engine,
            loss,
            evaluate,
            export,
            train_set,
            collate,
            cfg,
            dist,
            objective="accuracy",
            best="accuracy",
            best_mode="max",
        ),
        cfg,
        run_dir,
        dist,
    )
