"""End to end: loggers (TensorBoard, wandb offline) with secrets kept out of the run directory, torchrun,
fine-tuning from a local Hugging Face directory under ZeRO-3, checkpoint rotation, and Hydra multirun."""
from __future__ import annotations

import json

import pytest

from tests.e2e import QUICK, metrics, run_cli, run_dir_of, summary

pytestmark = pytest.mark.e2e


def test_tensorboard_logs_loss_and_checkpoints_rotate(tmp_path):
    run_dir = run_dir_of(run_cli(tmp_path, "logger=tensorboard", "train.save_every=10", "train.keep_last=2", *QUICK))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, list(run_dir.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "eval/loss" in tags, tags
    logged = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert logged[40] == pytest.approx(metrics(run_dir, "train/loss")[40])
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step*")) == ["step30", "step40"]


def test_wandb_offline_and_no_secret_in_run_dir(tmp_path):
    secret = "sk-test-0123456789abcdef-SECRET"
    proc = run_cli(tmp_path, "logger=wandb", "logger.mode=offline", f"+logger.api_key={secret}", *QUICK)
    run_dir = run_dir_of(proc)
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb did not log offline into the run directory"
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"secret written to {path}"
    assert "<redacted>" in (run_dir / "overrides.yaml").read_text()
    assert "wandb: logging offline" in proc.stdout + proc.stderr


def test_torchrun_two_ranks(tmp_path):
    proc = run_cli(tmp_path, "deployment=torchrun", "deployment.nproc_per_node=2", "train.micro_batch_size=4",
                   "zero=stage1", *QUICK)
    run_dir = run_dir_of(proc)
    assert "torchrun --standalone --nnodes 1 --nproc_per_node 2 -m runner.worker" in (run_dir / "launch.sh").read_text()
    assert summary(run_dir)["world_size"] == 2
    losses = metrics(run_dir, "train/loss")
    assert losses[40] < 0.6 * losses[5]


def test_finetune_from_local_hf_directory_under_zero3(tmp_path):
    base = run_dir_of(run_cli(tmp_path, *QUICK))
    proc = run_cli(tmp_path, f"model.path={base / 'export'}", f"model.tokenizer={base / 'export'}", "zero=stage3",
                   *QUICK)
    run_dir = run_dir_of(proc)
    # it starts from the trained model: its first loss is near where the base run ended, far below a fresh model's
    base_losses, losses = metrics(base, "train/loss"), metrics(run_dir, "train/loss")
    assert losses[5] < 0.5 * base_losses[5]
    assert summary(run_dir)["eval_loss"] <= summary(base)["eval_loss"] * 1.05


def test_multirun_gives_each_point_its_own_run_dir(tmp_path):
    proc = run_cli(tmp_path, "-m", "zero=stage0,stage1", "train.max_steps=10", "train.log_every=5",
                   "train.eval_max_batches=2")
    dirs = [p.parent for p in (tmp_path / "outputs" / "multirun").rglob("ds_config.json")]
    assert len(dirs) == 2, proc.stdout
    stages = sorted(json.loads((d / "ds_config.json").read_text())["zero_optimization"]["stage"] for d in dirs)
    assert stages == [0, 1]
    assert all((d / "summary.json").exists() for d in dirs)
