"""The training loop every method shares: steps, logging, evaluation, checkpoints, resume, early stop, exports and
the summary. A method hands it a task (the `Task` protocol below): its engines, one training step, an evaluation, an
export, and the state it must carry across a resume. `Supervised` is the task of every method that trains on a
per-batch loss (SFT, reward model, DPO); on-policy methods (PPO) implement `train_step` as rollout → experience →
update.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from omegaconf import DictConfig, OmegaConf

from runner import faults
from runner.data import batches as data_batches
from runner.train import adapt, checkpoint, engine as eng, lifecycle, metrics as run_metrics
from runner.train.engine import Dist
from runner.train.metrics import Metrics, Throughput


class Task(Protocol):
    name: str
    engines: dict  # the trained engines, checkpointed under one tag; the first is the run's main one
    objective: str  # eval metric reported as the run's objective
    headline: str  # train metric whose first and last values the summary reports
    best: str | None  # eval metric whose best value keeps checkpoints/best (None: no best checkpoint)
    best_mode: str  # max | min
    evaluate_first: bool  # evaluate before the first step (step 0: the starting model)

    def train_step(self, step: int, log: bool) -> dict | None: ...  # -> metrics to log when `log`
    def evaluate(self) -> dict: ...  # every rank calls it
    def export(self, run_dir: Path) -> dict[str, Path]: ...  # every rank calls it
    def state_dict(self) -> dict: ...  # the same on every rank
    def load_state_dict(self, state: dict) -> None: ...
    def rank_state_dict(self) -> dict: ...  # this rank's own (e.g. an EMA partition)
    def load_rank_state_dict(self, state: dict) -> None: ...
    def reset_interval(self) -> None: ...  # throughput restarts (after eval / save)
    def summary(self) -> dict: ...  # the method's own summary keys
    def notes(self) -> list[str]: ...  # lines for the console once it starts


def run(task: Task, cfg: DictConfig, run_dir: Path, dist: Dist) -> dict | None:
    train_cfg, total = cfg.train, int(cfg.runtime.total_steps)
    life = lifecycle.current()
    loop = {"step": 0, "best": None, "eval_initial": None, "eval_first": None, "eval_last": None}
    steady_mb = None  # what is held after a step: the model states (optimizer state exists from the first step)
    if cfg.resume:
        state, rank_state = checkpoint.load(task.engines, run_dir, cfg.runtime.resume, dist, int(cfg.seed))
        loop.update(state["loop"])
        task.load_state_dict(state["task"])
        task.load_rank_state_dict(rank_state)
        if dist.main:  # what an attempt logged after its checkpoint is replaced by what this one logs
            run_metrics.trim(run_dir, loop["step"])
    metrics = Metrics(run_dir, dist, cfg, total, loop["step"])
    for note in task.notes() + _wandb_note(cfg):
        metrics.note(note)

    def save(step: int, keep_last: int, tag: str | None = None) -> None:
        checkpoint.save(
            task.engines,
            run_dir,
            step,
            {"loop": loop, "task": task.state_dict()},
            task.rank_state_dict(),
            keep_last,
            dist,
            tag=tag,
        )

    if task.evaluate_first and loop["eval_initial"] is None:
        loop["eval_initial"] = loop["eval_last"] = task.evaluate()  # the starting model, before any step
        loop["eval_first"] = {"step": 0, **loop["eval_initial"]}
        metrics.log(0, loop["eval_initial"], prefix="eval")
    adapting = adapt.attach(task, cfg, loop, dist) if cfg.train.adapt.enabled else None  # train.adapt
    started, step = time.time(), loop["step"]
    stop_at = int(train_cfg.stop_at_step or total)
    log_every, eval_every, save_every = int(train_cfg.log_every), int(train_cfg.eval_every), int(train_cfg.save_every)
    while step < min(total, stop_at):
        log = (step + 1) % log_every == 0 or step + 1 in (total, stop_at)
        values = task.train_step(step + 1, log)
        step += 1
        if steady_mb is None:
            steady_mb = eng.gather_objects(round(eng.memory_mb(dist.device), 1), dist.world)
        loop["step"] = step
        metrics.advance()
        if log:
            metrics.log(step, values)

        new_best, paused = False, False
        if (eval_every and step % eval_every == 0) or step == total:
            paused = True
            loop["eval_last"] = task.evaluate()
            loop["eval_first"] = loop["eval_first"] or {"step": step, **loop["eval_last"]}  # (the verdict's "before")
            metrics.log(step, loop["eval_last"], prefix="eval")
            if adapting:
                metrics.log(step, adapting(loop["eval_last"].get(task.objective)), prefix="adapt")
            if task.best:
                value, best = loop["eval_last"][task.best], loop["best"]
                new_best = best is None or (value > best if task.best_mode == "max" else value < best)
                if new_best:
                    loop["best"] = value
        if (save_every and step % save_every == 0) or step in (total, stop_at):
            paused = True
            save(step, int(train_cfg.keep_last))
        if new_best:
            save(step, 0, tag="best")
        if paused:  # evaluation and checkpoint time is not training throughput
            task.reset_interval()
        faults.maybe_signal_driver(step, dist.rank)
        if step < min(total, stop_at) and life.should_stop():  # preempted or asked to stop: checkpoint, then exit
            if not (save_every and step % save_every == 0):
                save(step, int(train_cfg.keep_last))
            life.end("preempted", step=step, reason=life.requested)
            metrics.close(None)
            return None

    if step < total:  # stopped on purpose (train.stop_at_step): checkpoint saved, resume continues
        metrics.close(None)
        life.end("stopped", step=step, **_objective(task, loop))
        metrics.note(
            f"stopped at step {step} of {total} (train.stop_at_step); continue with "
            f"`python -m runner resume={run_dir} train.stop_at_step=null`"
        )
        return None

    exports = task.export(run_dir) if train_cfg.export else {}
    headline = run_metrics.read(run_dir, f"train/{task.headline}") if dist.main else []
    last = loop["eval_last"] or {}
    partitions = {name: eng.local_partition_numel(e, dist) for name, e in task.engines.items()}
    summary = {
        "stage": task.name,
        "steps": step,
        "world_size": dist.world,
        "wall_time_s": time.time() - started,
        f"train_{task.headline}_first": headline[0] if headline else None,
        f"train_{task.headline}_last": headline[-1] if headline else None,
        **{f"eval_{k}": v for k, v in last.items()},
        "objective": last.get(task.objective),
        "objective_name": task.objective,
        "objective_mode": "min" if adapt.minimise(task.objective) else "max",
        "eval_first": loop["eval_first"],  # the first evaluation (step 0: the starting model), for the verdict
        "best": {task.best: loop["best"]} if task.best else None,
        "peak_memory_mb": eng.gather_objects(round(eng.peak_memory_mb(dist.device), 1), dist.world),
        "memory_after_first_step_mb": steady_mb,
        "data": OmegaConf.to_container(cfg.runtime.data.stats) if cfg.runtime.data else None,
        **task.summary(),
        **{k: str(v) for k, v in exports.items()},
        "zero_partitioned_numel": partitions.popitem()[1] if len(partitions) == 1 else partitions,
    }
    if task.evaluate_first:  # a policy's held-out reward before training and after it
        initial, final = loop["eval_initial"]["reward_mean"], last["reward_mean"]
        summary.update(eval_reward_initial=initial, eval_reward_final=final, eval_reward_gain=final - initial)
        if "pass_rate" in last:  # a verifiable task: the share of held-out answers that are right
            summary.update(
                eval_pass_rate_initial=loop["eval_initial"]["pass_rate"], eval_pass_rate_final=last["pass_rate"]
            )
    metrics.close(summary)
    life.end("completed", step=step, **_objective(task, loop))
    return summary


def _objective(task, loop: dict) -> dict:
    """The objective at the last evaluation, for the rank's record (population-based training reads it)."""
    return {"objective_name": task.objective, "objective": (loop["eval_last"] or {}).get(task.objective)}


def _wandb_note(cfg: DictConfig) -> list[str]:
    mode = os.environ.get("WANDB_MODE") if cfg.logger.name == "wandb" else None  # set by the worker
    if not mode:
        return []
    return [
        f"wandb: logging {mode}" + (" (no API key configured; `wandb sync` uploads later)" if mode == "offline" else "")
    ]


# ------------------------------------------------------------------------------------------ supervised methods
class Supervised:
    """A task trained on a per-batch loss over a tokenised data set: gradient accumulation over
    train.gradient_accumulation_steps micro-batches, losses and throughput averaged over each logging interval."""

    def __init__(
        self,
        name: str,
        engine,
        loss: Callable[[dict], tuple[torch.Tensor, dict]],
        evaluate: Callable[[], dict],
        export: Callable[[Path], dict],
        train_set,
        collate,
        cfg: DictConfig,
        dist: Dist,
        objective: str,
        best: str | None = None,
        best_mode: str = "max",
        judge: str | None = None,
    ):
        self.name, self.engine, self.loss, self._evaluate, self._export = name, engine, loss, evaluate, export
        self.judge = judge  # a policy judged on held-out prompts (by what, in words): its starting point too
        self.evaluate_first = judge is not None
        self.engines = {"model": engine}
        self.train_set, self.collate, self.dist = train_set, collate, dist
        self.objective, self.best, self.best_mode, self.headline = objective, best, best_mode, "loss"
        self.gas = int(cfg.train.gradient_accumulation_steps)
        self.cursor = data_batches.Cursor(
            len(train_set),
            int(cfg.train.micro_batch_size),
            dist.data_world,
            dist.data_rank,
            int(cfg.seed),
            group=self.gas,
        )
        self.tokens = 0
        self.speed, self.losses, self.extras = Throughput(), [], {}

    def train_step(self, step: int, log: bool) -> dict | None:
        grad_norm = None
        for micro_step in range(self.gas):
            host = self.collate([self.train_set[i] for i in self.cursor.next()])
            self.speed.add(host)  # counted on the host's copy: no wait for the device
            batch = to_device(host, self.dist.device)
            loss, extra = self.loss(batch)
            self.engine.backward(loss)
            if log and micro_step == self.gas - 1:
                grad_norm = eng.grad_norm(self.engine)
            self.engine.step()
            # kept as (device) tensors and read on logging steps only: reading each one waits for the device
            self.losses.append(loss.detach())
            for k, v in extra.items():
                self.extras.setdefault(k, []).append(v.detach() if isinstance(v, torch.Tensor) else v)
        return self._interval(grad_norm) if log else None

    def _interval(self, grad_norm: float | None) -> dict:
        """Means over the logging interval (all ranks), then a new interval."""
        dist, speed = self.dist, self.speed
        means = [_mean(self.losses)] + [_mean(v) for v in self.extras.values()]
        reduced = eng.all_reduce_sum(means + [speed.tokens, speed.padded, speed.samples], dist.device)
        # every rank of a tensor/sequence-parallel group counted its group's whole batch
        tokens, padded, samples = (v / (dist.tensor * dist.sequence) for v in reduced[-3:])
        elapsed = max(time.perf_counter() - speed.start, 1e-9)
        self.tokens += int(tokens)
        values = {
            "loss": reduced[0] / dist.world,
            **{k: v / dist.world for k, v in zip(self.extras, reduced[1 : len(means)])},
            "lr": self.engine.get_lr()[0],
            "grad_norm": _float(grad_norm if grad_norm is not None else self.engine.get_global_grad_norm()),
            "tokens_per_s": tokens / elapsed,
            "samples_per_s": samples / elapsed,
            "padding_share": 1 - tokens / max(padded, 1),
            "epoch": self.cursor.epoch,
            "peak_memory_mb": eng.gather_objects(round(eng.peak_memory_mb(dist.device), 1), dist.world),
        }
        self.losses.clear()
        self.extras.clear()
        speed.reset()
        return values

    def set_accumulation(self, gas: int) -> None:
        """Change the global batch through gradient accumulation (train.adapt); the micro-batch stays."""
        if gas != self.gas:
            self.gas = self.cursor.group = gas
            self.engine.set_train_batch_size(gas * self.engine.train_micro_batch_size_per_gpu() * self.dist.data_world)

    def evaluate(self) -> dict:
        return self._evaluate()

    def export(self, run_dir: Path) -> dict[str, Path]:
        return self._export(run_dir)

    def state_dict(self) -> dict:
        return {"data": self.cursor.state_dict(), "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.cursor.load_state_dict(state["data"])
        self.tokens = state["tokens"]

    def rank_state_dict(self) -> dict:
        return {}

    def load_rank_state_dict(self, state: dict) -> None:
        pass

    def reset_interval(self) -> None:
        self.speed.reset()

    def summary(self) -> dict:
        out = {"epochs_started": self.cursor.epoch + 1, "tokens_trained": self.tokens}
        return {**out, "eval_judge": self.judge} if self.judge else out

    def notes(self) -> list[str]:
        return []


def _mean(values: list) -> float:
    """The mean of an interval's values (tensors or numbers) as Python floats, added in order as before."""
    return sum(float(v) for v in values) / len(values)


def _float(value) -> float | None:
    return None if value is None else float(value)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def evaluate_batches(
    engine, dataset, collate, micro: int, dist: Dist, max_batches: int | None, fn: Callable[[dict], dict[str, float]]
) -> dict[str, float]:
    """Run `fn` (batch -> sums) over this rank's share of `dataset` and all-reduce the sums. Every rank runs the
    same number of forward passes, as ZeRO-3 gathers parameters collectively. The ranks of a tensor- or
    sequence-parallel group read the same batches (runner.train.parallel)."""
    engine.eval()
    batches = data_batches.eval_batches(len(dataset), micro, dist.data_world, dist.data_rank)
    if max_batches:
        batches = batches[:max_batches]
    longest = max(eng.gather_objects(len(batches), dist.world))
    sums: dict[str, float] = {}
    with torch.no_grad():
        for i in range(longest):
            idx = batches[i] if i < len(batches) else (batches[0] if batches else [0])
            out = fn(to_device(collate([dataset[j] for j in idx]), dist.device))
            if i < len(batches):
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
    keys = sorted(sums) if sums else []
    keys = eng.gather_objects(keys, dist.world)[0]  # rank 0's keys (every rank with data has the same)
    reduced = eng.all_reduce_sum([sums.get(k, 0.0) for k in keys], dist.device)
    engine.train()
    # the ranks of a tensor-parallel group each hold the whole batch's sums (a sequence-parallel rank: its slice's)
    return {k: v / dist.tensor for k, v in zip(keys, reduced)}


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
