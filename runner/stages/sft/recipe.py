"""SFT on the ranks: the loss is on the response tokens only unless step.train_on_prompt; batches are padded to
their longest sample (with data.packing, training rows hold several samples: runner/data/packing.py). Evaluation:
loss and perplexity on the eval split and, when the config names a judge (reward=...), its mean score of answers
sampled for the eval prompts, before training and after it. Export: a Hugging Face causal LM."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from runner import modeling, rewards
from runner.data import batches, packing
from runner.data.prepare import load_prepared
from runner.train import checkpoint, engine as eng, loop, models, onpolicy, parallel, rollout
from runner.train.engine import Dist


def run(cfg: DictConfig, run_dir: Path, dist: Dist) -> None:
    # 1. data and the model's engine
    eng.seed_everything(int(cfg.seed))
    tokenizer = modeling.load_tokenizer(cfg.model)
    train_set, eval_set = load_prepared(cfg.runtime.data.paths.train), load_prepared(cfg.runtime.data.paths.eval)
    collate = batches.CausalLMCollator(tokenizer.pad_token_id, train_on_prompt=bool(cfg.step.train_on_prompt))
    train_collate = collate  # with data.packing, training rows hold several samples each; eval rows one
    if cfg.data.packing:
        train_collate = packing.PackedCollator(tokenizer.pad_token_id, bool(cfg.step.train_on_prompt))
    ds_config = eng.ds_config(run_dir)
    model = models.load_causal_lm(
        cfg.model, ds_config, cfg.precision.dtype, cfg.train.gradient_checkpointing, cfg.lora, cfg.lora.r
    )
    mpu = parallel.prepare(model, dist, int(cfg.train.micro_batch_size))  # AutoTP's or Ulysses' groups
    engine = eng.initialize(model, cfg.optimizer, ds_config, mpu=mpu)
    sequence_parallel = dist.sequence > 1
    judge, prompts = rollout.make_judge(cfg, run_dir, tokenizer, tokenizer.pad_token_id), onpolicy.Prompts(eval_set)

    # 2. the loss, the evaluation and the export
    attention, dtype = packing.attention_of(engine)

    def loss(batch: dict):
        if sequence_parallel:
            return parallel.causal_lm_loss(engine, batch), {}
        return engine(**packing.model_inputs(batch, attention, dtype)).loss, {}

    def token_loss_sums(batch: dict) -> dict[str, float]:
        if sequence_parallel:  # this rank's slice of each sequence: the evaluation adds up the slices
            summed, count = parallel.token_loss(engine, batch)
            return {"loss_sum": float(summed), "tokens": float(count)}
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        summed = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)),
            labels.reshape(-1),
            ignore_index=batches.IGNORE,
            reduction="sum",
        )
        return {"loss_sum": float(summed), "tokens": float((labels != batches.IGNORE).sum())}

    def evaluate() -> dict:
        sums = loop.evaluate_batches(
            engine,
            eval_set,
            collate,
            int(cfg.train.micro_batch_size),
            dist,
            cfg.train.eval_max_batches,
            token_loss_sums,
        )
        mean = sums["loss_sum"] / max(sums["tokens"], 1)
        out = {"loss": mean, "perplexity": loop.perplexity(mean), "tokens": int(sums["tokens"])}
        if judge:
            pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
            out.update(onpolicy.judged_heldout(engine, prompts, judge, cfg, dist, pad, eos))
        return out

    def export(run_dir: Path) -> dict:
        return checkpoint.export_model(engine, tokenizer, run_dir, dist, cfg, {"kind": "causal_lm", "stage": "sft"})

    # 3. the shared loop
    loop.run(
        loop.Supervised(
            "sft",
            engine,
            loss,
            evaluate,
            export,
            train_set,
            train_collate,
            cfg,
            dist,
            objective="loss",
            judge=rewards.describe(cfg.reward) if judge else None,
        ),
        cfg,
        run_dir,
        dist,
    )
