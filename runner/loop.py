"""The training loop every supervised stage shares: gradient accumulation, logging, evaluation, checkpoints,
resume, early stop and the summary. A stage hands it a loss function, an evaluation and an export."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from runner import checkpoint, data, engine as eng
from runner.engine import Dist
from runner.metrics import Metrics, Throughput

LossFn = Callable[[dict], "tuple[torch.Tensor, dict[str, float]]"]


@dataclasses.dataclass
class Stage:
    """What a stage contributes to the loop."""
    name: str
    loss: LossFn                                   # batch on device -> (loss, extra metrics to average)
    evaluate: Callable[[], dict]                   # -> eval metrics (every rank calls it)
    export: Callable[[Path], Path]                 # -> directory of the exported model (every rank calls it)
    objective: str                                 # eval metric reported as the run's objective
    best: str | None = None                        # eval metric whose best value keeps a `best` checkpoint
    best_mode: str = "max"


def _float(value) -> float | None:
    return None if value is None else float(value)


def _batch_on(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def run(stage: Stage, engine, cfg: DictConfig, run_dir: Path, dist: Dist, train_set, collate) -> dict | None:
    train_cfg, rt = cfg.train, cfg.runtime
    micro, gas, total_steps = int(train_cfg.micro_batch_size), int(train_cfg.gradient_accumulation_steps), int(
        rt.total_steps)
    wandb_mode = os.environ.get("WANDB_MODE") if cfg.logger.name == "wandb" else None  # set by the worker

    state = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "tokens": 0, "best": None}
    if cfg.resume:
        state = {**state, **checkpoint.resume(engine, run_dir, dist)}
    metrics = Metrics(run_dir, engine, dist, cfg, total_steps, state["step"])
    if dist.main and wandb_mode:
        metrics.bar.write(f"wandb: logging {wandb_mode}" + (" (no API key configured; `wandb sync` uploads later)"
                                                            if wandb_mode == "offline" else ""))

    def epoch_batches(epoch: int) -> list[list[int]]:
        return data.train_batches(len(train_set), micro, dist.world, dist.rank, int(cfg.seed), epoch)

    speed, losses, extras, last_eval = Throughput(), [], {}, None
    started, step = time.time(), state["step"]
    batches = epoch_batches(state["epoch"])
    stop_at = int(train_cfg.stop_at_step or total_steps)
    while step < min(total_steps, stop_at):
        logging_step = (step + 1) % int(train_cfg.log_every) == 0 or step + 1 in (total_steps, stop_at)
        grad_norm = None
        for micro_step in range(gas):
            if state["micro_in_epoch"] >= len(batches) // gas * gas:  # next epoch (an incomplete last step is dropped)
                state["epoch"], state["micro_in_epoch"] = state["epoch"] + 1, 0
                batches = epoch_batches(state["epoch"])
            batch = _batch_on(collate([train_set[i] for i in batches[state["micro_in_epoch"]]]), dist.device)
            loss, extra = stage.loss(batch)
            engine.backward(loss)
            if logging_step and micro_step == gas - 1:
                grad_norm = eng.grad_norm(engine)
            engine.step()
            state["micro_in_epoch"] += 1
            speed.add(batch)
            losses.append(float(loss.detach()))
            for k, v in extra.items():
                extras.setdefault(k, []).append(float(v))
        step += 1
        state["step"] = step
        metrics.advance()

        if logging_step:
            means = [sum(losses) / len(losses)] + [sum(v) / len(v) for v in extras.values()]
            reduced = eng.all_reduce_sum(means + [speed.tokens, speed.padded, speed.samples], dist.device)
            tokens, padded, samples = reduced[-3:]
            elapsed = max(time.perf_counter() - speed.start, 1e-9)
            state["tokens"] += int(tokens)
            peak = eng.gather_objects(round(eng.peak_memory_mb(dist.device), 1), dist.world)
            values = {"loss": reduced[0] / dist.world,
                      **{k: v / dist.world for k, v in zip(extras, reduced[1:len(means)])},
                      "lr": engine.get_lr()[0],
                      "grad_norm": _float(grad_norm if grad_norm is not None else engine.get_global_grad_norm()),
                      "tokens_per_s": tokens / elapsed, "samples_per_s": samples / elapsed,
                      "padding_share": 1 - tokens / max(padded, 1), "epoch": state["epoch"], "peak_memory_mb": peak}
            metrics.log(step, values)
            losses.clear()
            extras.clear()
            speed.reset()

        eval_every = int(train_cfg.eval_every)
        new_best, paused = False, False
        if (eval_every and step % eval_every == 0) or step == total_steps:
            paused = True
            last_eval = stage.evaluate()
            metrics.log(step, last_eval, prefix="eval")
            if stage.best:
                value, best = last_eval[stage.best], state["best"]
                new_best = best is None or (value > best if stage.best_mode == "max" else value < best)
                if new_best:
                    state["best"] = value
        save_every = int(train_cfg.save_every)
        if (save_every and step % save_every == 0) or step in (total_steps, stop_at):
            paused = True
            checkpoint.save(engine, run_dir, step, state, int(train_cfg.keep_last), dist)
        if new_best:
            checkpoint.save(engine, run_dir, step, state, 0, dist, tag="best")
        if paused:  # evaluation and checkpoint time is not training throughput; the interval restarts after them
            speed.reset()

    if step < total_steps:  # stopped on purpose (train.stop_at_step): checkpoint saved, resume continues
        metrics.close(None)
        if dist.main:
            print(f"stopped at step {step} of {total_steps} (train.stop_at_step); continue with "
                  f"`python -m runner resume={run_dir} train.stop_at_step=null`")
        return None

    export_dir = stage.export(run_dir / "export") if train_cfg.export else None
    peak = eng.gather_objects(round(eng.peak_memory_mb(dist.device), 1), dist.world)
    train_losses = _read(run_dir, "train/loss") if dist.main else []
    summary = {"stage": stage.name, "steps": step, "epochs_started": state["epoch"] + 1, "world_size": dist.world,
               "wall_time_s": time.time() - started,
               "train_loss_first": train_losses[0] if train_losses else None,
               "train_loss_last": train_losses[-1] if train_losses else None,
               **{f"eval_{k}": v for k, v in (last_eval or {}).items()},
               "objective": (last_eval or {}).get(stage.objective), "objective_name": stage.objective,
               "best": {stage.best: state["best"]} if stage.best else None,
               "tokens_trained": state["tokens"], "peak_memory_mb": peak,
               "data": OmegaConf.to_container(rt.data.stats) if rt.data else None,
               "export_dir": str(export_dir) if export_dir else None,
               "zero_partitioned_numel": _local_partition_numel(engine, dist)}
    metrics.close(summary)
    return summary


def _read(run_dir: Path, key: str) -> list[float]:
    path = run_dir / "metrics.jsonl"
    return [r[key] for r in map(json.loads, path.read_text().splitlines()) if key in r]


def _local_partition_numel(engine, dist: Dist) -> list[int] | None:
    """Under ZeRO-3, the parameter elements each rank holds: evidence that parameters really are sharded."""
    if not engine.zero_optimization_partition_weights():
        return None
    local = sum(p.ds_tensor.numel() for p in engine.module.parameters() if hasattr(p, "ds_tensor"))
    return eng.gather_objects(int(local), dist.world)


def evaluate_batches(engine, dataset, collate, micro: int, dist: Dist, max_batches: int | None,
                     fn: Callable[[dict], dict[str, float]]) -> dict[str, float]:
    """Run `fn` (batch -> sums) over this rank's share of `dataset` and all-reduce the sums. Every rank runs the
    same number of forward passes, as ZeRO-3 gathers parameters collectively."""
    engine.eval()
    batches = data.eval_batches(len(dataset), micro, dist.world, dist.rank)
    if max_batches:
        batches = batches[:max_batches]
    longest = max(eng.gather_objects(len(batches), dist.world))
    sums: dict[str, float] = {}
    with torch.no_grad():
        for i in range(longest):
            idx = batches[i] if i < len(batches) else (batches[0] if batches else [0])
            out = fn(_batch_on(collate([dataset[j] for j in idx]), dist.device))
            if i < len(batches):
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
    keys = sorted(sums) if sums else []
    keys = eng.gather_objects(keys, dist.world)[0]  # rank 0's keys (every rank with data has the same)
    reduced = eng.all_reduce_sum([sums.get(k, 0.0) for k in keys], dist.device)
    engine.train()
    return dict(zip(keys, reduced))


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
