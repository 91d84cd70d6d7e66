"""Stage 1, SFT: supervised fine-tuning of a causal LM on prompt/response pairs.

    python -m runner step=sft model=opt-1.3b zero=stage3 deployment=single_gpu

Loss is on the response tokens only unless step.train_on_prompt; batches are padded to their longest sample.
Evaluation reports loss and perplexity on the eval split; the export is a Hugging Face causal LM.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from runner import checkpoint, data, engine as eng, loop, modeling
from runner.engine import Dist


def run(cfg: DictConfig, ds_config: dict, run_dir: Path, dist: Dist) -> None:
    eng.seed_everything(int(cfg.seed))
    tokenizer = modeling.load_tokenizer(cfg.model)
    train_set = data.load_prepared(cfg.runtime.data.paths.train)
    eval_set = data.load_prepared(cfg.runtime.data.paths.eval)
    collate = data.CausalLMCollator(tokenizer.pad_token_id, train_on_prompt=bool(cfg.step.train_on_prompt))

    model = modeling.load_causal_lm(cfg.model, ds_config, cfg.precision.dtype, cfg.train.gradient_checkpointing,
                                     cfg.lora, cfg.lora.r)
    engine = eng.initialize(model, cfg.optimizer, ds_config)

    def loss(batch: dict):
        return engine(**batch).loss, {}

    def token_loss_sums(batch: dict) -> dict[str, float]:
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        summed = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                   ignore_index=data.IGNORE, reduction="sum")
        return {"loss_sum": float(summed), "tokens": float((labels != data.IGNORE).sum())}

    def evaluate() -> dict:
        sums = loop.evaluate_batches(engine, eval_set, collate, int(cfg.train.micro_batch_size), dist,
                                     cfg.train.eval_max_batches, token_loss_sums)
        mean = sums["loss_sum"] / max(sums["tokens"], 1)
        return {"loss": mean, "perplexity": loop.perplexity(mean), "tokens": int(sums["tokens"])}

    def export(out_dir: Path) -> Path:
        return checkpoint.export_hf(engine, tokenizer, out_dir, dist, {"kind": "causal_lm", "stage": "sft",
                                                                       "run_dir": str(run_dir)},
                                   cfg.lora, cfg.lora.r)

    stage = loop.Stage(name="sft", loss=loss, evaluate=evaluate, export=export, objective="loss")
    loop.run(stage, engine, cfg, run_dir, dist, train_set, collate)
