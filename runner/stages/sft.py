"""Stage 1, SFT: supervised fine-tuning of a causal LM on prompt/response pairs.

    python -m runner step=sft model=opt-1.3b zero=stage3 deployment=single_gpu

Read top to bottom: set-up, resume, the training loop (log / eval / checkpoint every N steps), export.
Loss is on response tokens only unless step.train_on_prompt; batches are padded to their longest sample.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from runner import checkpoint, data, engine as eng, modeling
from runner.engine import Dist
from runner.metrics import Metrics, Throughput, configure_wandb_env


@torch.no_grad()
def evaluate(engine, dataset, collate, micro: int, dist: Dist, max_batches: int | None) -> dict:
    engine.eval()
    loss_sum, tokens = 0.0, 0
    batches = data.eval_batches(len(dataset), micro, dist.world, dist.rank)
    if max_batches:
        batches = batches[:max_batches]
    # Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively).
    longest = max(eng.gather_objects(len(batches), dist.world))
    for i in range(longest):
        idx = batches[i] if i < len(batches) else batches[0] if batches else [0]
        batch = {k: v.to(dist.device) for k, v in collate([dataset[j] for j in idx]).items()}
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        if i >= len(batches):
            continue
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                   ignore_index=data.IGNORE, reduction="sum")
        loss_sum += float(losses)
        tokens += int((labels != data.IGNORE).sum())
    loss_sum, tokens = eng.all_reduce_sum([loss_sum, tokens], dist.device)
    engine.train()
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(tokens)}


def run(cfg: DictConfig, ds_config: dict, run_dir: Path, dist: Dist) -> None:
    train_cfg, rt = cfg.train, cfg.runtime
    eng.seed_everything(int(cfg.seed))
    wandb_mode = configure_wandb_env(cfg, run_dir)

    # ---- set-up: tokenizer, data (tokenised by the driver), model, engine
    tokenizer = modeling.load_tokenizer(cfg.model)
    train_set = data.load_prepared(rt.data.paths.train)
    eval_set = data.load_prepared(rt.data.paths.eval)
    collate = data.CausalLMCollator(tokenizer.pad_token_id, train_on_prompt=bool(cfg.step.train_on_prompt))
    model = modeling.load_causal_lm(cfg.model, ds_config, cfg.precision.dtype, train_cfg.gradient_checkpointing)
    engine = eng.initialize(model, cfg.optimizer, ds_config)
    micro, gas, total_steps = int(train_cfg.micro_batch_size), int(train_cfg.gradient_accumulation_steps), int(
        rt.total_steps)

    # ---- resume: model, optimizer, scheduler, RNG, step and data position
    state = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "tokens": 0}
    if cfg.resume:
        state = checkpoint.resume(engine, run_dir, dist)
    metrics = Metrics(run_dir, engine, dist, cfg, total_steps, state["step"])
    if dist.main and wandb_mode:
        metrics.bar.write(f"wandb: logging {wandb_mode}" + (" (no API key configured; `wandb sync` uploads later)"
                                                            if wandb_mode == "offline" else ""))

    # ---- training loop: GAS micro-batches per optimizer step
    speed, losses, last_eval = Throughput(), [], None
    started, step = time.time(), state["step"]
    epoch_batches = data.train_batches(len(train_set), micro, dist.world, dist.rank, int(cfg.seed), state["epoch"])
    stop_at = int(train_cfg.stop_at_step or total_steps)
    while step < min(total_steps, stop_at):
        logging_step = (step + 1) % int(train_cfg.log_every) == 0 or step + 1 == total_steps
        grad_norm = None
        for micro_step in range(gas):
            if state["micro_in_epoch"] >= len(epoch_batches) // gas * gas:  # next epoch (incomplete steps dropped)
                state["epoch"], state["micro_in_epoch"] = state["epoch"] + 1, 0
                epoch_batches = data.train_batches(len(train_set), micro, dist.world, dist.rank, int(cfg.seed),
                                                   state["epoch"])
            idx = epoch_batches[state["micro_in_epoch"]]
            batch = {k: v.to(dist.device) for k, v in collate([train_set[i] for i in idx]).items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            if logging_step and micro_step == gas - 1:
                grad_norm = eng.grad_norm(engine)
            engine.step()
            state["micro_in_epoch"] += 1
            speed.add(batch)
            losses.append(float(loss))
        step += 1
        state["step"] = step
        metrics.advance()

        if step % int(train_cfg.log_every) == 0 or step == total_steps:
            loss_mean, tokens, padded, samples = eng.all_reduce_sum(
                [sum(losses) / len(losses), speed.tokens, speed.padded, speed.samples], dist.device)
            elapsed = max(time.perf_counter() - speed.start, 1e-9)
            state["tokens"] += int(tokens)
            peak = eng.gather_objects(round(eng.peak_memory_mb(dist.device), 1), dist.world)
            metrics.log(step, {"loss": loss_mean / dist.world, "lr": engine.get_lr()[0],
                               "grad_norm": _float(grad_norm if grad_norm is not None else engine.get_global_grad_norm()),
                               "tokens_per_s": tokens / elapsed, "samples_per_s": samples / elapsed,
                               "padding_share": 1 - tokens / max(padded, 1), "epoch": state["epoch"],
                               "peak_memory_mb": peak})
            losses.clear()
            speed.reset()
        eval_every = int(train_cfg.eval_every)
        if (eval_every and step % eval_every == 0) or step == total_steps:
            last_eval = evaluate(engine, eval_set, collate, micro, dist, train_cfg.eval_max_batches)
            metrics.log(step, last_eval, prefix="eval")
        save_every = int(train_cfg.save_every)
        if (save_every and step % save_every == 0) or step in (total_steps, stop_at):
            checkpoint.save(engine, run_dir, step, state, int(train_cfg.keep_last), dist)

    if step < total_steps:  # stopped early on purpose (train.stop_at_step): checkpoint saved, resume continues
        metrics.close(None)
        if dist.main:
            print(f"stopped at step {step} of {total_steps} (train.stop_at_step); continue with "
                  f"`python -m runner resume={run_dir} train.stop_at_step=null`")
        return

    # ---- export and summary
    export_dir = None
    if train_cfg.export:
        export_dir = checkpoint.export_hf(engine, tokenizer, run_dir / "export", dist,
                                          {"kind": "causal_lm", "stage": "sft", "step": step, "run_dir": str(run_dir)})
    first_losses = _read_losses(run_dir) if dist.main else []
    peak = eng.gather_objects(round(eng.peak_memory_mb(dist.device), 1), dist.world)
    summary = {"stage": "sft", "steps": step, "epochs_started": state["epoch"] + 1, "world_size": dist.world,
               "wall_time_s": time.time() - started, "train_loss_first": first_losses[0] if first_losses else None,
               "train_loss_last": first_losses[-1] if first_losses else None,
               "eval_loss": last_eval and last_eval["loss"], "eval_perplexity": last_eval and last_eval["perplexity"],
               "objective": last_eval and last_eval["loss"], "tokens_trained": state["tokens"],
               "peak_memory_mb": peak, "data": OmegaConf.to_container(rt.data.stats),
               "export_dir": str(export_dir) if export_dir else None,
               "zero_partitioned_numel": _local_partition_numel(engine, dist)}
    metrics.close(summary)


def _float(value) -> float | None:
    return None if value is None else float(value)


def _read_losses(run_dir: Path) -> list[float]:
    import json

    path = run_dir / "metrics.jsonl"
    return [r["train/loss"] for r in map(json.loads, path.read_text().splitlines()) if "train/loss" in r]


def _local_partition_numel(engine, dist: Dist) -> list[int] | None:
    """Under ZeRO-3, the number of parameter elements each rank holds (evidence that parameters are sharded)."""
    if not engine.zero_optimization_partition_weights():
        return None
    local = sum(p.ds_tensor.numel() for p in engine.module.parameters() if hasattr(p, "ds_tensor"))
    return eng.gather_objects(int(local), dist.world)
