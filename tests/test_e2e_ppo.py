"""PPO and the three-step pipeline end to end on CPU: two ranks with a ZeRO-3 actor and a ZeRO-3 critic (where
DeepSpeed-Chat's critic fails), LoRA + EMA + the pretraining-loss mixture with a resume that continues exactly, and
the tiny pipeline raising the mean reward of held-out prompts over the SFT policy, then skipping its finished stages
and resuming the unfinished one when run again."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.helpers import metrics, run_cli, run_dir_of, summary

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent
PPO = [
    "step=ppo",
    "data.sets.tiny.splits.eval=heldout",
    "step.generation_batch_size=8",
    "train.micro_batch_size=4",
    "step.max_prompt_len=32",
    "step.generation.max_new_tokens=16",
    "optimizer.lr=1e-3",
    "step.critic.lr=1e-4",
    "scheduler.warmup_steps=2",
    "train.eval_max_batches=2",
]
PER_STEP = [
    "reward_mean",
    "reward_std",
    "kl",
    "kl_coef",
    "entropy",
    "actor_loss",
    "critic_loss",
    "clip_fraction",
    "value_clip_fraction",
    "response_length",
    "gen_time_s",
    "experience_time_s",
    "train_time_s",
    "tokens_per_s",
    "gen_tokens_per_s",
    "actor_lr",
    "critic_lr",
]


def sources(sft_run, reward_run):
    return [f"step.actor_from={sft_run / 'export'}", f"step.critic_from={reward_run / 'export'}"]


def test_two_ranks_zero3_actor_and_zero3_critic(sft_run, reward_run, tmp_path):
    from tests.helpers import ds_parse

    run = run_dir_of(
        run_cli(
            tmp_path,
            *PPO,
            *sources(sft_run, reward_run),
            "zero@step.actor.zero=stage3",  # the actor's and the critic's ZeRO, under the same names
            "zero@step.critic.zero=stage3",
            "step.ema.enabled=true",  # the EMA keeps each rank's partition and gathers them for its export
            "deployment=cpu",
            "deployment.nproc_per_node=2",
            "train.max_steps=4",
            "train.eval_every=4",
            "step.print_answers_every=2",
        )
    )
    s = summary(run)
    assert s["steps"] == 4 and s["world_size"] == 2
    for engine in ("actor", "critic"):  # each rank holds about half of each trained model
        per_rank = s["zero_partitioned_numel"][engine]
        assert len(per_rank) == 2 and max(per_rank) < 0.6 * sum(per_rank)
    for name in ("ds_config.json", "ds_config.critic.json", "ds_config.reference.json", "ds_config.reward.json"):
        ds = json.loads((run / name).read_text())
        assert ds["zero_optimization"]["stage"] == 3
        ds_parse(ds, world_size=2)  # DeepSpeed's own parser accepts every engine's JSON
    rows = metrics(run, "train/reward_mean")
    assert sorted(rows) == [1, 2, 3, 4]
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-2]
    for key in PER_STEP:
        assert f"train/{key}" in last or any(
            f"train/{key}" in json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
        ), key
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and all(r["prompt"] and "answer" in r for r in samples)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    AutoModelForCausalLM.from_pretrained(run / "export")
    AutoModelForSequenceClassification.from_pretrained(run / "export_critic")
    assert json.loads((run / "export_critic" / "runner_export.json").read_text())["kind"] == "critic"
    from safetensors.torch import load_file

    sft, actor, ema = (
        load_file(d / "model.safetensors") for d in (sft_run / "export", run / "export", run / "export_ema")
    )
    for key in ("model.decoder.layers.0.self_attn.q_proj.weight", "model.decoder.layers.1.fc2.weight"):
        moved, ema_moved = (actor[key] - sft[key]).abs().max(), (ema[key] - sft[key]).abs().max()
        assert moved > 0 and 0 < ema_moved < moved, key  # gathered from both ranks' partitions: it trails the actor


@pytest.mark.slow
def test_lora_ema_and_mixture_resume_exactly(sft_run, reward_run, tmp_path):
    """LoRA on actor and critic, the EMA and the pretraining mixture together; a run stopped at step 3 and resumed
    gives the same steps 4-6 as an uninterrupted run."""
    features = [
        *PPO,
        *sources(sft_run, reward_run),
        "lora.r=4",
        "step.critic.lora_r=4",
        "step.ema.enabled=true",
        "step.unsupervised.path=${asset:tiny_data}",
        "step.unsupervised.field=response",
        "train.max_steps=6",
        "train.eval_every=6",
    ]
    whole = run_dir_of(run_cli(tmp_path / "whole", *features)) if (tmp_path / "whole").mkdir() is None else None
    (tmp_path / "parts").mkdir()
    parts = run_dir_of(run_cli(tmp_path / "parts", *features, "train.stop_at_step=3"))
    assert not (parts / "export").exists() and sorted(metrics(parts, "train/reward_mean")) == [1, 2, 3]
    run_cli(tmp_path / "parts", f"resume={parts}", "train.stop_at_step=null")
    for key in ("train/reward_mean", "train/actor_loss", "train/critic_loss", "train/ptx_loss"):
        a, b = metrics(whole, key), metrics(parts, key)
        for step in (4, 5, 6):
            assert b[step] == pytest.approx(a[step], abs=1e-4), (key, step)
    ptx = metrics(whole, "train/ptx_loss")
    assert ptx[6] < ptx[1]  # the mixture's LM loss is trained

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    sft = load_file(sft_run / "export" / "model.safetensors")
    actor = load_file(whole / "export" / "model.safetensors")
    ema = load_file(whole / "export_ema" / "model.safetensors")
    assert set(actor) == set(sft) and not any("lora" in k for k in actor)  # LoRA merged into the weights
    _, info = AutoModelForCausalLM.from_pretrained(whole / "export", output_loading_info=True)
    assert not any(info.values())
    key = "model.decoder.layers.0.self_attn.q_proj.weight"
    moved, ema_moved = (actor[key] - sft[key]).abs().max(), (ema[key] - sft[key]).abs().max()
    assert moved > 0 and 0 < ema_moved < moved  # the EMA trails the actor (beta 0.992)
    assert torch.equal(actor["model.decoder.embed_tokens.weight"], sft["model.decoder.embed_tokens.weight"])  # frozen


def test_tiny_pipeline_raises_heldout_reward_then_skips_and_resumes(tmp_path):
    ppo = yaml.safe_load((REPO / "recipes" / "rlhf_tiny.yaml").read_text())["step"]["ppo"]

    def as_list(items):  # Hydra's syntax for a list of override strings: each element quoted
        return "[" + ",".join(f"'{o}'" for o in items) + "]"

    stopped = "step.ppo=" + as_list(ppo + ["train.stop_at_step=30", "train.save_every=10"])
    first = run_cli(tmp_path, "recipe=rlhf_tiny", stopped)
    pipe = Path(re.search(r"^=== pipeline stage sft: (.+)/sft$", first.stdout, re.MULTILINE).group(1))
    assert json.loads((pipe / "summary.json").read_text())["status"] == "paused"
    assert sorted(metrics(pipe / "ppo", "train/reward_mean"))[-1] == 30

    again = run_cli(tmp_path, "recipe=rlhf_tiny", f"resume={pipe}", "step.ppo=" + as_list(ppo))  # without the stop
    assert "sft: completed earlier, skipped" in again.stdout
    assert "reward: completed earlier, skipped" in again.stdout
    assert "ppo: resuming from its latest checkpoint" in again.stdout
    steps = [
        json.loads(line)["step"]
        for line in (pipe / "ppo" / "metrics.jsonl").read_text().splitlines()
        if "train/reward_mean" in line
    ]
    assert steps == list(range(1, 61))  # one line per step: nothing trained twice, nothing skipped
    s = json.loads((pipe / "summary.json").read_text())
    assert s["status"] == "completed" and set(s["stages"]) == {"sft", "reward", "ppo"}
    # held-out prompts (items no stage trained on), judged by the task's ground truth (reward=tiny: the format and
    # the share of positive adjectives) while PPO trains on its reward model's score, which rises too
    assert s["ppo"]["eval_judge"] == "tiny:ground_truth" and s["ppo"]["eval_reward_gain"] > 0.05, s["ppo"]
    assert "ppo: held-out reward (tiny:ground_truth)" in again.stdout
    rm = metrics(pipe / "ppo", "train/reward_mean")
    assert sum(rm[k] for k in range(51, 61)) > sum(rm[k] for k in range(1, 11)) + 1.0


@pytest.mark.slow
def test_gathered_copy_rollouts_equal_the_sharded_engines(sft_run, reward_run, tmp_path):
    """Two ranks, ZeRO-3 actor and critic: rollouts from the whole copy of the actor (step.rollout.gathered_copy,
    on by default here) sample the same answers and give the same rewards and losses as rollouts through the
    sharded engine, step by step."""
    args = [
        *PPO,
        *sources(sft_run, reward_run),
        "zero@step.actor.zero=stage3",
        "zero@step.critic.zero=stage3",
        "deployment=cpu",
        "deployment.nproc_per_node=2",
        "train.max_steps=3",
        "train.eval_every=0",
        "train.export=false",
    ]
    runs = {}
    for copy in ("true", "false"):
        (tmp_path / copy).mkdir()
        runs[copy] = run_dir_of(run_cli(tmp_path / copy, *args, f"step.rollout.gathered_copy={copy}"))
    for key in ("train/reward_mean", "train/actor_loss", "train/critic_loss", "train/kl", "train/response_length"):
        assert metrics(runs["true"], key) == pytest.approx(metrics(runs["false"], key), abs=1e-6), key
