"""Running the real CLI end to end (through the real launcher) from a test, and reading what a run wrote."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

# Few steps, small evaluations: enough for the tiny model's loss to fall clearly on 2 CPU cores.
QUICK = ["train.max_steps=40", "train.log_every=5", "train.eval_every=20", "train.eval_max_batches=4"]


def run_cli(cwd: Path, *overrides: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    proc = subprocess.run([sys.executable, "-m", "runner", *overrides], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"runner failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_dir_of(proc: subprocess.CompletedProcess) -> Path:
    match = re.search(r"^run directory: (.+)$", proc.stdout, re.MULTILINE)
    assert match, proc.stdout
    return Path(match.group(1))


def metrics(run_dir: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def checkpoint_state(run_dir: Path) -> dict:
    """The fp32 weights of a run's latest DeepSpeed checkpoint, whatever its ZeRO stage."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = run_dir / "checkpoints"
    if json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"] == 0:
        tag = (ckpt / "latest").read_text().strip()
        return torch.load(ckpt / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
