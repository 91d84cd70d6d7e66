"""DPO end to end on CPU: the tiny recipe (SFT then DPO) learns the held-out preferences and improves answers by the
task's ground truth; two-rank ZeRO-3 (policy and reference) resumes exactly like an uninterrupted run; LoRA-DPO's
reference is the policy with its adapters off, with no second copy of the model in memory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.helpers import checkpoint_state, metrics, run_cli, run_dir_of, summary

pytestmark = pytest.mark.e2e
DPO = ["step=dpo", "train.log_every=1", "train.eval_max_batches=2", "step.generation.max_new_tokens=8"]


def test_dpo_tiny_recipe_learns_heldout_preferences_and_improves_answers(tmp_path):
    proc = run_cli(tmp_path, "recipe=dpo_tiny")
    pipe = Path(re.search(r"^=== pipeline stage sft: (.+)/sft$", proc.stdout, re.MULTILINE).group(1))
    s = json.loads((pipe / "summary.json").read_text())
    assert s["status"] == "completed" and list(s["stages"]) == ["sft", "dpo"]
    run = pipe / "dpo"
    dpo = summary(run)
    # held-out items (no stage trains on them): preference accuracy, and the ground truth of sampled answers
    assert dpo["objective_name"] == "accuracy" and dpo["objective"] >= 0.85, dpo
    assert dpo["eval_judge"] == "tiny:ground_truth" and dpo["eval_reward_gain"] > 0, dpo
    assert s["dpo"]["eval_reward_gain"] == dpo["eval_reward_gain"]
    assert f"dpo: held-out accuracy: {dpo['objective']:.4g}" in proc.stdout
    assert "dpo: held-out reward (tiny:ground_truth)" in proc.stdout and "warning" not in proc.stderr
    steps = sorted(metrics(run, "eval/accuracy"))
    assert steps[0] == 0 and steps[-1] == dpo["steps"]  # judged before training and after it
    margin = list(metrics(run, "train/margin").values())
    assert sum(margin[-3:]) > sum(margin[:3])  # the implicit reward margin grows
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "export")  # a plain Hugging Face model


@pytest.mark.slow
def test_dpo_zero3_two_ranks_resumes_exactly(tmp_path, sft_run):
    """Policy and reference both ZeRO-3 on two ranks; a run stopped at step 3 and resumed gives the same steps 4-6
    and the same weights as an uninterrupted run."""
    args = [
        *DPO,
        f"step.init_from={sft_run / 'export'}",
        "zero=stage3",
        "deployment=cpu",
        "deployment.nproc_per_node=2",
        "train.micro_batch_size=4",
        "train.max_steps=6",
        "train.eval_every=6",
    ]
    (tmp_path / "whole").mkdir()
    whole = run_dir_of(run_cli(tmp_path / "whole", *args))
    (tmp_path / "parts").mkdir()
    parts = run_dir_of(run_cli(tmp_path / "parts", *args, "train.stop_at_step=3"))
    assert sorted(metrics(parts, "train/loss")) == [1, 2, 3]
    run_cli(tmp_path / "parts", f"resume={parts}", "train.stop_at_step=null")
    for key in ("train/loss", "train/margin", "train/drift"):
        a, b = metrics(whole, key), metrics(parts, key)
        assert [b[s] for s in (4, 5, 6)] == pytest.approx([a[s] for s in (4, 5, 6)], abs=1e-5), key
    s = summary(whole)
    assert s["world_size"] == 2 and len(s["zero_partitioned_numel"]) == 2  # the policy is sharded
    assert json.loads((whole / "ds_config.reference.json").read_text())["zero_optimization"]["stage"] == 3
    assert s["eval_accuracy"] is not None and s["eval_drift"] != 0
    import torch

    w, p = checkpoint_state(whole), checkpoint_state(parts)
    assert set(w) == set(p) and all(torch.allclose(w[k], p[k], atol=1e-6) for k in w)


@pytest.mark.slow
def test_lora_dpo_keeps_no_second_copy_of_the_model(tmp_path):
    """A 19M-parameter model (75 MB in fp32) with LoRA: the reference is the policy with its adapters switched off.
    The same run with the reference as a frozen engine (step.reference_from) holds one model more (the resident
    memory after the first step, when the model states are all allocated and every engine has run); the LoRA run
    holds no copy."""
    model = [
        "model.arch.hidden_size=512",
        "model.arch.ffn_dim=2048",
        "model.arch.num_hidden_layers=6",
        "model.arch.word_embed_proj_dim=512",
        "model.num_params=null",
        "model.largest_layer_params=null",
    ]
    args = [*DPO, "lora.r=8", "train.max_steps=2", "train.eval_every=2", "train.micro_batch_size=4"]
    (tmp_path / "base").mkdir()
    base = run_dir_of(run_cli(tmp_path / "base", *args, *model)) / "export"  # a 19M model to start from
    runs = {}
    for mode, extra in (("adapters", []), ("engine", [f"step.reference_from={base}"])):
        (tmp_path / mode).mkdir()
        runs[mode] = run_dir_of(run_cli(tmp_path / mode, *args, f"step.init_from={base}", *extra))
        assert json.loads((runs[mode] / "export" / "runner_export.json").read_text())["reference"] == mode
    assert not (runs["adapters"] / "ds_config.reference.json").exists()
    params = yaml.safe_load((runs["adapters"] / "config.yaml").read_text())["runtime"]["num_params"]
    model_mb = 4 * params / 2**20
    assert model_mb > 60, model_mb
    held = {m: summary(r)["memory_after_first_step_mb"][0] for m, r in runs.items()}
    assert 0.8 * model_mb < held["engine"] - held["adapters"] < 1.5 * model_mb, (held, model_mb)
    peak = {m: summary(r)["peak_memory_mb"][0] for m, r in runs.items()}
    assert peak["engine"] - peak["adapters"] > 0.8 * model_mb, (peak, model_mb)
