"""runner.api: composing and planning from Python (what the command line composes and plans), bad input as
ConfigError, and end to end: examples/custom_grpo_loop.py, a GRPO loop of its own launched on the ranks by the API,
and a worker that fails (RunFailed)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from runner import api
from runner.errors import ConfigError
from tests.helpers import REPO, metrics, summary


def test_compose_is_the_command_lines_config(compose):
    cfg = api.compose(["step=grpo", "reward=tiny", "step.rollout.n=8"])
    ours = compose(["step=grpo", "reward=tiny", "step.rollout.n=8"])
    assert cfg.step == ours.step and cfg.train == ours.train and cfg.reward == ours.reward
    assert str(cfg.run_dir).startswith("outputs/grpo/")  # hydra.run.dir, as the command line's default
    assert api.compose(["run_dir=/tmp/elsewhere"]).run_dir == "/tmp/elsewhere"


def test_plan_returns_what_a_dry_run_prints(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    plan = api.plan(["zero=stage3", "deployment=cpu", "deployment.nproc_per_node=2", "train.micro_batch_size=4"])
    ds = plan.ds_configs[""]
    assert plan.world_size == 2 and ds["train_batch_size"] == 8 and ds["zero_optimization"]["stage"] == 3
    assert plan.command[:3] == ["deepspeed", "--num_gpus", "2"] and plan.command[-2:] == [
        "runner.worker",
        str(plan.run_dir),
    ]
    assert plan.config.precision.dtype == "fp32" and plan.config.runtime.total_steps > 0  # resolved, data counted
    assert plan.memory["devices"] == 2 and plan.memory["per_device_gb"] > 0 and plan.env["DS_ACCELERATOR"] == "cpu"
    assert not plan.run_dir.exists() and "HF_HUB_OFFLINE" not in os.environ  # nothing written, no side effect


def test_bad_input_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="(?s)train.lr: is not a key.*did you mean optimizer.lr"):
        api.plan(["train.lr=1e-4"])
    with pytest.raises(ConfigError, match="Could not find 'zero/stage9'"):
        api.compose(["zero=stage9"])
    with pytest.raises(ConfigError, match="train.micro_batch_size: must be a positive integer"):
        api.plan(["train.micro_batch_size=0"])
    with pytest.raises(ConfigError, match="worker: .* is not a file"):
        api.launch(["dry_run=true"], worker="no/such/loop.py")


@pytest.mark.e2e
def test_custom_grpo_loop_example(sft_run, tmp_path):
    """The example trains GRPO through its own loop on the ranks: a step per loop turn in metrics.jsonl with finite
    losses, the export differs from the SFT model it started from, and the driver recorded the run as completed."""
    import torch
    from safetensors.torch import load_file

    run_dir = tmp_path / "loop"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "examples/custom_grpo_loop.py", f"step.init_from={sft_run / 'export'}", f"run_dir={run_dir}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"custom loop: completed, 4 steps in {run_dir}" in proc.stdout
    assert f"examples/custom_grpo_loop.py {run_dir}" in (run_dir / "launch.sh").read_text()  # the ranks ran it
    losses = metrics(run_dir, "train/actor_loss")
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    assert all(math.isfinite(v) for v in metrics(run_dir, "train/reward_mean").values())
    done = summary(run_dir)
    assert done["loop"] == "custom (runner.api.Session)" and done["steps"] == 4 and done["advantage"] == "grpo"
    assert math.isfinite(done["eval_reward_gain"]) and 4 in metrics(run_dir, "eval/reward_mean")
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    before, after = (
        load_file(sft_run / "export" / "model.safetensors"),
        load_file(run_dir / "export" / "model.safetensors"),
    )
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, changed  # trained, not copied


@pytest.mark.e2e
def test_a_worker_that_fails_raises_run_failed(tmp_path):
    script = tmp_path / "broken_loop.py"
    script.write_text("raise RuntimeError('my loop is broken')\n")
    with pytest.raises(api.RunFailed) as failed:
        api.launch(["train.max_steps=1", f"run_dir={tmp_path / 'run'}"], worker=script)
    assert failed.value.status == "failed" and failed.value.exit_code != 0 and failed.value.run_dir == tmp_path / "run"
    assert "my loop is broken" in (tmp_path / "run" / "launch.log").read_text()
