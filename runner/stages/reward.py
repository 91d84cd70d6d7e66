"""Stage 2, reward model: a scalar head on a causal-LM backbone, trained on chosen/rejected pairs.

    python -m runner step=reward model=opt-350m data=rm-static zero=stage3

Each batch holds B pairs as 2B sequences (chosen first); a sequence's score is the head's value at its last real
token; loss = -log sigmoid(r_chosen - r_rejected - margin). Evaluation reports pairwise accuracy, the mean chosen and
rejected scores and their margin; the best-accuracy checkpoint is kept as checkpoints/best.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from runner import checkpoint, data, engine as eng, loop, modeling
from runner.engine import Dist


def run(cfg: DictConfig, ds_config: dict, run_dir: Path, dist: Dist) -> None:
    eng.seed_everything(int(cfg.seed))
    tokenizer = modeling.load_tokenizer(cfg.model)
    train_set = data.load_prepared(cfg.runtime.data.paths.train)
    eval_set = data.load_prepared(cfg.runtime.data.paths.eval)
    collate = data.PairCollator(tokenizer.pad_token_id)

    model = modeling.load_scalar_model(cfg.model, ds_config, cfg.precision.dtype, tokenizer.pad_token_id,
                                       cfg.train.gradient_checkpointing, cfg.lora, cfg.lora.r)
    engine = eng.initialize(model, cfg.optimizer, ds_config)
    margin = float(cfg.step.margin)

    def pair_scores(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        scores = modeling.last_token_scores(engine(batch["input_ids"], batch["attention_mask"]),
                                            batch["attention_mask"])
        return scores.chunk(2)

    def loss(batch: dict):
        chosen, rejected = pair_scores(batch)
        value = -F.logsigmoid(chosen - rejected - margin).mean()
        return value, {"accuracy": (chosen > rejected).float().mean(), "chosen_score": chosen.mean(),
                       "rejected_score": rejected.mean()}

    def sums(batch: dict) -> dict[str, float]:
        chosen, rejected = pair_scores(batch)
        return {"pairs": chosen.numel(), "correct": float((chosen > rejected).sum()), "chosen": float(chosen.sum()),
                "rejected": float(rejected.sum()), "loss": float(-F.logsigmoid(chosen - rejected - margin).sum())}

    def evaluate() -> dict:
        s = loop.evaluate_batches(engine, eval_set, collate, int(cfg.train.micro_batch_size), dist,
                                  cfg.train.eval_max_batches, sums)
        n = max(s["pairs"], 1)
        return {"accuracy": s["correct"] / n, "chosen_score": s["chosen"] / n, "rejected_score": s["rejected"] / n,
                "margin": (s["chosen"] - s["rejected"]) / n, "loss": s["loss"] / n, "pairs": int(s["pairs"])}

    def export(out_dir: Path) -> Path:
        return checkpoint.export_hf(engine, tokenizer, out_dir, dist, {
            "kind": "reward_model", "stage": "reward", "run_dir": str(run_dir),
            "load": "transformers.AutoModelForSequenceClassification.from_pretrained(this directory)",
            "score": "the model's value (logits[..., 0] of the score head) at the last non-padding token"},
            cfg.lora, cfg.lora.r)

    stage = loop.Stage(name="reward", loss=loss, evaluate=evaluate, export=export, objective="accuracy",
                       best="accuracy", best_mode="max")
    loop.run(stage, engine, cfg, run_dir, dist, train_set, collate)
