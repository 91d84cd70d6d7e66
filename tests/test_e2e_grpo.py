"""Critic-free RL end to end on CPU: the tiny recipe (SFT then GRPO, judged and rewarded by the task's ground truth, a
function: no reward model, no critic) raises the held-out reward; RLOO with the KL in the reward on two ranks with a
ZeRO-3 policy and reference resumes exactly like an uninterrupted run; a reward function that raises stops the run
with a message naming it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import checkpoint_state, metrics, run_cli, run_dir_of, summary

pytestmark = pytest.mark.e2e
GRPO = [
    "step=grpo",
    "reward=tiny",
    "train.log_every=1",
    "train.eval_max_batches=1",
    "step.max_prompt_len=32",
    "step.generation.max_new_tokens=8",
]


def test_grpo_tiny_recipe_raises_the_heldout_reward_without_critic_or_reward_model(tmp_path):
    proc = run_cli(tmp_path, "recipe=grpo_tiny")
    pipe = Path(re.search(r"^=== pipeline stage sft: (.+)/sft$", proc.stdout, re.MULTILINE).group(1))
    s = json.loads((pipe / "summary.json").read_text())
    assert s["status"] == "completed" and list(s["stages"]) == ["sft", "grpo"]
    run = pipe / "grpo"
    grpo = summary(run)
    # held-out items no stage trains on, scored by the task's ground truth (the same function as the reward)
    assert grpo["eval_judge"] == "tiny:ground_truth" and grpo["eval_reward_gain"] > 0.2, grpo
    assert s["grpo"]["eval_reward_gain"] == grpo["eval_reward_gain"]
    assert f"grpo: held-out reward (tiny:ground_truth): {grpo['eval_reward_initial']:.3f}" in proc.stdout
    assert "warning" not in proc.stderr
    # no critic and no reward model: the policy's JSON and its frozen reference's, nothing else
    assert sorted(p.name for p in run.glob("ds_config*.json")) == ["ds_config.json", "ds_config.reference.json"]
    assert grpo["critic"] is None and grpo["advantage"] == "grpo"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/actor_loss" in r]
    assert len(train) == grpo["steps"] == 100
    for key in (
        "reward_mean",
        "reward_std",
        "zero_variance_groups",
        "kl_loss",
        "response_length",
        "clip_fraction",
        "entropy",
        "experience_time_s",
    ):
        assert all(f"train/{key}" in r for r in train), key
    assert 0 < grpo["zero_variance_groups"] < 1
    assert all(r["train/gen_time_s"] > 0 and r["train/experience_time_s"] > 0 for r in train)
    rewards = [r["train/reward_mean"] for r in train]
    assert sum(rewards[-10:]) > sum(rewards[:10])  # the training reward rises too
    assert (run / "samples.jsonl").read_text().count("\n") > 0
    assert (run / "curves.png").stat().st_size > 10000  # every finished run draws its curves
    card = (run / "export" / "README.md").read_text()  # and its export has a model card
    assert "trained with grpo" in card and f"{grpo['eval_reward_gain']:+.4g}" in card


@pytest.mark.slow
def test_rloo_two_ranks_zero3_resumes_exactly(tmp_path, sft_run):
    """RLOO, KL in the reward, policy and reference ZeRO-3 on two ranks (generation in lockstep); stopped at step 2
    and resumed, it gives the same steps 3-4 and the same weights as an uninterrupted run."""
    args = [
        *GRPO,
        "step.advantage=rloo",
        "step.kl.placement=reward",
        f"step.init_from={sft_run / 'export'}",
        "zero=stage3",
        "deployment=cpu",
        "deployment.nproc_per_node=2",
        "step.rollout.prompts=2",
        "step.rollout.n=4",
        "train.micro_batch_size=4",
        "train.max_steps=4",
        "train.eval_every=4",
    ]
    (tmp_path / "whole").mkdir()
    whole = run_dir_of(run_cli(tmp_path / "whole", *args))
    (tmp_path / "parts").mkdir()
    parts = run_dir_of(run_cli(tmp_path / "parts", *args, "train.stop_at_step=2"))
    assert sorted(metrics(parts, "train/actor_loss")) == [1, 2]
    run_cli(tmp_path / "parts", f"resume={parts}", "train.stop_at_step=null")
    for key in ("train/actor_loss", "train/reward_mean", "train/kl", "train/response_length"):
        a, b = metrics(whole, key), metrics(parts, key)
        assert [b[s] for s in (3, 4)] == pytest.approx([a[s] for s in (3, 4)], abs=1e-5), key
    s = summary(whole)
    assert s["world_size"] == 2 and len(s["zero_partitioned_numel"]) == 2 and s["advantage"] == "rloo"
    assert json.loads((whole / "ds_config.reference.json").read_text())["zero_optimization"]["stage"] == 3
    import torch

    w, p = checkpoint_state(whole), checkpoint_state(parts)
    assert set(w) == set(p) and all(torch.allclose(w[k], p[k], atol=1e-6) for k in w)


def test_a_reward_function_that_raises_stops_the_run_naming_it(tmp_path):
    """From the model group's model (built from its architecture: no export needed), with a user's reward function
    that raises: the run fails at its first scoring, and the status and console name the function and the row."""
    (tmp_path / "my_rewards.py").write_text("def raises(prompts, answers, rows):\n    return 1 / 0\n")
    proc = run_cli(
        tmp_path,  # (the ranks run here: my_rewards is importable, as a user's module in their directory would be)
        *GRPO,
        "reward.terms=[{fn: 'my_rewards:raises', weight: 1.0}]",
        "train.max_steps=2",
        check=False,
    )
    assert proc.returncode != 0
    run = run_dir_of(proc)
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed"
    assert "reward function raises raised ZeroDivisionError: division by zero" in status["reason"], status["reason"]
    assert "the first for" in status["reason"] and "reward function raises" in proc.stderr
    tail = proc.stderr[proc.stderr.index("the ranks' last output") :]  # the traceback's end, and where the rest is
    assert str(run / "launch.log") in tail and "ZeroDivisionError" in tail and "[INFO]" not in tail
    assert not (run / "export").exists()
