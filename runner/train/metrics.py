"""Metrics: metrics.jsonl and summary.json in the run directory, rank 0's progress bar and evaluations on the user's
console (runner.console: the driver draws them), and the run's trackers (TensorBoard / wandb / CSV,
runner.train.trackers), all on the optimizer-step axis."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from omegaconf import DictConfig

from runner import console
from runner.train.engine import Dist
from runner.train.trackers import Trackers, wandb_mode


def configure_wandb_env(cfg: DictConfig, run_dir: Path) -> str | None:
    """wandb's files go into the run directory; returns the mode it logs in (online / offline)."""
    if cfg.logger.name != "wandb":
        return None
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    os.environ["WANDB_MODE"] = mode = wandb_mode(cfg)
    return mode


class Metrics:
    def __init__(self, run_dir: Path, dist: Dist, cfg: DictConfig, total_steps: int, start_step: int):
        self.run_dir, self.dist = run_dir, dist
        self.total_steps = total_steps
        self.file = open(run_dir / "metrics.jsonl", "a") if dist.main else None
        self.bar, self.trackers = None, None
        if dist.main:
            self.bar = console.Progress(cfg.step.name, total_steps, start_step)
            self.trackers = Trackers(cfg, run_dir, start_step)

    def log(self, step: int, values: dict, prefix: str = "train") -> None:
        if not self.dist.main:
            return
        record = {"step": step, **{f"{prefix}/{k}" if prefix else k: v for k, v in values.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.trackers.log(step, record)
        if prefix == "train":
            self.bar.show(values)
        elif prefix == "eval":
            self.bar.flush()
            console.line(
                f"step {step}: eval " + "  ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float))
            )

    def note(self, text: str) -> None:
        """A line for the user's console (rank 0's)."""
        if self.dist.main:
            console.line(text)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(n)

    def close(self, summary: dict | None) -> None:
        if not self.dist.main:
            return
        self.bar.close()
        self.file.close()
        self.trackers.close(summary)
        if summary is not None:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


class Throughput:
    """Real tokens, computed (padded) tokens and samples since the last reset, and when it was."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.tokens, self.padded, self.samples = time.perf_counter(), 0, 0, 0

    def add(self, batch) -> None:
        mask = batch["attention_mask"]
        self.tokens += int(mask.sum())
        self.padded += mask.numel()
        if "seq_ids" in batch:  # packed rows (runner.data.packing): each sample starts at position 0
            self.samples += int(((batch["position_ids"] == 0) & mask.bool()).sum())
        else:
            self.samples += mask.shape[0]


def trim(run_dir: Path, step: int) -> None:
    """Drop the lines of metrics.jsonl and samples.jsonl logged after `step` (by an attempt that died after its last
    checkpoint), so that a resumed run's files hold each step once."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = run_dir / name
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in kept))


def read(run_dir: Path, key: str) -> list[float]:
    """Every value of one metric in a run's metrics.jsonl, in order."""
    path = run_dir / "metrics.jsonl"
    return [r[key] for r in map(json.loads, path.read_text().splitlines()) if key in r]
