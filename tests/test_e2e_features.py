"""End to end: loggers (TensorBoard, wandb offline) with secrets kept out of the run directory, torchrun,
fine-tuning from a local Hugging Face directory under ZeRO-3, and checkpoint rotation."""

from __future__ import annotations

import json

import pytest

from tests.helpers import QUICK, metrics, run_cli, run_dir_of, summary, tensorboard_scalars, wandb_history

pytestmark = pytest.mark.e2e


def logged_steps(run_dir) -> tuple[set[int], set[int]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"] for r in rows if "train/loss" in r}, {r["step"] for r in rows if "eval/loss" in r}


def test_tensorboard_logs_every_metric_on_the_step_axis_and_checkpoints_rotate(tmp_path):
    run_dir = run_dir_of(run_cli(tmp_path, "logger=tensorboard", "train.save_every=10", "train.keep_last=2", *QUICK))
    scalars = tensorboard_scalars(run_dir)
    train, evals = logged_steps(run_dir)
    assert set(scalars["train/loss"]) == train == {5, 10, 15, 20, 25, 30, 35, 40}
    assert set(scalars["eval/loss"]) == evals == {20, 40} and set(scalars["train/lr"]) == train
    assert not [t for t in scalars if t.startswith("Train/Samples")]  # DeepSpeed's sample-count axis is not used
    assert scalars["train/loss"][40] == pytest.approx(metrics(run_dir, "train/loss")[40])
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step*")) == ["step30", "step40"]


def test_wandb_offline_keeps_every_metric_and_no_secret_in_run_dir(tmp_path):
    secret = "sk-test-0123456789abcdef-SECRET"
    proc = run_cli(tmp_path, "logger=wandb", "logger.mode=offline", f"+logger.api_key={secret}", *QUICK)
    run_dir = run_dir_of(proc)
    history = wandb_history(run_dir)
    train, evals = logged_steps(run_dir)
    assert {s for s, keys in history.items() if "train/loss" in keys} == train
    assert {s for s, keys in history.items() if {"eval/loss", "eval/perplexity"} <= keys} == evals
    assert "Tried to log to step" not in (run_dir / "launch.log").read_text()  # (wandb's warning, from the rank)
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"secret written to {path}"
    assert secret not in proc.stdout + proc.stderr
    assert "<redacted>" in (run_dir / "overrides.yaml").read_text()
    assert "+logger.api_key=<redacted>" in (run_dir / "status.json").read_text()
    assert "wandb: logging offline" in proc.stdout + proc.stderr


def test_torchrun_two_ranks(tmp_path):
    proc = run_cli(
        tmp_path,
        "deployment=torchrun",
        "deployment.nproc_per_node=2",
        "train.micro_batch_size=4",
        "zero=stage1",
        *QUICK,
    )
    run_dir = run_dir_of(proc)
    assert "torchrun --standalone --nnodes 1 --nproc_per_node 2 -m runner.worker" in (run_dir / "launch.sh").read_text()
    assert summary(run_dir)["world_size"] == 2
    losses = metrics(run_dir, "train/loss")
    assert losses[40] < 0.6 * losses[5]


def test_finetune_from_local_hf_directory_under_zero3(tmp_path, sft_run):
    export = sft_run / "export"
    proc = run_cli(tmp_path, f"model.path={export}", f"model.tokenizer={export}", "zero=stage3", *QUICK)
    run_dir = run_dir_of(proc)
    # it starts from the trained model: its first loss is near where the base run ended, far below a fresh model's
    base_losses, losses = metrics(sft_run, "train/loss"), metrics(run_dir, "train/loss")
    assert losses[5] < 0.5 * base_losses[5]
    assert summary(run_dir)["eval_loss"] <= summary(sft_run)["eval_loss"] * 1.05
