"""Resuming a run: which checkpoint it continues from (the newest complete one), and whether the new launch can
load it — the same layout, or another number of ranks or ZeRO stage through DeepSpeed's universal checkpoints
(converted before launch). A layout that cannot be loaded is refused before anything is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from runner import manifest
from runner.errors import ConfigError

FIX = "resume with the run's own layout (its deployment.nproc_per_node and zero), or start a new run"


def _saved(run_dir: Path, name: str) -> dict:
    path = run_dir / (f"ds_config.{name}.json" if name else "ds_config.json")
    return json.loads(path.read_text()) if path.is_file() else {}


def _world(ds: dict) -> int:
    return ds["train_batch_size"] // (ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"])


def plan(
    run_dir: Path, configs: dict[str, dict], checkpointed: list[str], has_rank_state: bool
) -> tuple[str, int, dict[str, bool], list[str]]:
    """(tag, its step, engines to convert to the universal format, notes), or ConfigError. `configs`: the new
    launch's DeepSpeed JSONs ("" = the main engine); `checkpointed`: the engines the checkpoint holds ("" first);
    `has_rank_state`: the method keeps per-rank state (e.g. a ZeRO-3 EMA) that cannot move to other ranks."""
    tag, notes = manifest.resume_point(run_dir)
    if tag is None:
        found = manifest.step_tags(run_dir / "checkpoints")
        raise ConfigError(
            "resume",
            f"{run_dir} has no complete checkpoint to resume from"
            + (f" ({', '.join(found)} did not finish saving)" if found else ""),
            "set train.save_every=N so runs save checkpoints, or start a new run without resume=",
        )
    convert = {}
    for name in checkpointed:
        old, new = _saved(run_dir, name), configs[name]
        if not old:
            continue
        if old["train_batch_size"] != new["train_batch_size"]:
            raise ConfigError(
                "resume",
                f"the run was trained with {old['train_batch_size']} samples per step "
                f"(micro-batch × accumulation × ranks), this launch would use "
                f"{new['train_batch_size']}",
                "keep the global batch: set train.global_batch_size="
                f"{old['train_batch_size']} (accumulation follows), or resume with the run's layout",
            )
        for key in ("tensor_parallel", "sequence_parallel_size"):  # AutoTP's checkpoint holds one file per shard
            if old.get(key) != new.get(key):
                raise ConfigError(
                    "resume",
                    f"the run was trained with {key}={old.get(key)}, this launch would use {new.get(key)}",
                    "resume with the run's own parallel.tensor and parallel.sequence",
                )
        was, now = old["zero_optimization"]["stage"], new["zero_optimization"]["stage"]
        same = was == now and _world(old) == _world(new)
        if same:
            continue
        engine = f"the {name}'s" if name else "its"
        if (was == 0) != (now == 0):
            raise ConfigError(
                "resume",
                f"{engine} checkpoint was saved at ZeRO stage {was} and this launch uses "
                f"stage {now}: ZeRO-0 keeps the optimizer state in another layout than ZeRO-1/2/3, "
                "and DeepSpeed's universal checkpoints cannot convert it",
                FIX,
            )
        if was in (1, 2) and now == 3:
            raise ConfigError(
                "resume",
                f"{engine} checkpoint was saved at ZeRO stage {was}; DeepSpeed's universal "
                "checkpoints load a ZeRO-1/2 checkpoint at stage 1 or 2 only",
                FIX,
            )
        if has_rank_state and _world(old) != _world(new):
            raise ConfigError(
                "resume",
                "the method keeps per-rank state (the EMA of ZeRO-3 partitions), which "
                "cannot move to another number of ranks",
                FIX,
            )
        convert[name] = was != 0  # stage 0 at another world size loads as it is (every rank holds everything)
        notes.append(
            f"resuming {engine} ZeRO-{was} checkpoint on {_world(new)} rank(s) at ZeRO-{now} (saved on "
            f"{_world(old)})" + (" through DeepSpeed's universal checkpoint format" if was else "")
        )
    step = manifest.step_of(run_dir, tag)
    notes.append(f"resuming from checkpoint {tag} (step {step})")
    return tag, step, convert, notes


def convert(run_dir: Path, tag: str, engines: dict[str, bool], configs: dict[str, dict]) -> None:
    """Write `<tag>-universal` for every engine that needs it (once written, a later resume reuses it)."""
    from runner.driver.reshard import universal_tag

    ckpt = run_dir / "checkpoints"
    for name, needed in engines.items():
        folder = ckpt / name if name else ckpt
        if not needed or (folder / universal_tag(tag)).is_dir():
            continue
        stage = configs[name]["zero_optimization"]["stage"]
        done = subprocess.run(
            [sys.executable, "-m", "runner.driver.reshard", str(folder), tag, str(stage)],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise ConfigError(
                "resume",
                f"converting checkpoint {folder / tag} to the universal format failed: "
                f"{(done.stderr or done.stdout).strip().splitlines()[-1]}",
                FIX,
            )
