"""step.rollout.gathered_copy: the whole copy of a ZeRO-3 policy gives the sharded engine's numbers
(runner.train.gathered), LoRA merged; and the driver's resolution of the key."""

from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf

from runner.driver.plan import make_plan
from runner.errors import ConfigError
from runner.train.gathered import blocks
from tests.helpers import CPU, adamw, spawn_rank, tiny_model


def test_blocks_group_parameters_by_transformer_block():
    names = [
        "model.decoder.embed_tokens.weight",
        "model.decoder.layers.0.fc1.weight",
        "model.decoder.layers.0.fc1.base_layer.weight",
        "model.decoder.layers.1.fc1.weight",
        "model.decoder.layers.10.fc1.weight",
        "model.decoder.final_layer_norm.weight",
    ]
    assert blocks(names) == [
        ["model.decoder.embed_tokens.weight", "model.decoder.final_layer_norm.weight"],
        ["model.decoder.layers.0.fc1.weight", "model.decoder.layers.0.fc1.base_layer.weight"],
        ["model.decoder.layers.1.fc1.weight"],
        ["model.decoder.layers.10.fc1.weight"],
    ]


def _copy_vs_engine(port: int, queue) -> None:
    """One rank, ZeRO-3 (parameters partitioned at construction), LoRA on every linear: two optimizer steps, then the
    copy's and the engine's logits on the same batch; the copy is refreshed only after a step."""
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    from runner.train import engine as eng, models
    from runner.train.gathered import GatheredCopy, current

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    ds = {
        "train_batch_size": 4,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # every tensor partitioned
        "steps_per_print": 10**9,
    }
    model = tiny_model()
    lora = OmegaConf.create({"r": 4, "alpha": 16, "dropout": 0.0, "target_modules": "auto", "only_optimize": True})
    torch.manual_seed(0)
    net = models.load_causal_lm(model, ds, "fp32", lora=lora, lora_r=4)
    engine = eng.initialize(net, adamw(1e-2), ds)
    copy = GatheredCopy(engine, lora, 4)
    ids = torch.randint(3, int(model.arch.vocab_size), (4, 16), generator=torch.Generator().manual_seed(1))
    out = {"partitioned": all(p.numel() == 0 for p in engine.module.parameters())}
    for step in range(2):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        with torch.no_grad():
            mine = current(copy)(input_ids=ids).logits
            theirs = engine(input_ids=ids).logits
        out[f"diff{step}"] = float((mine - theirs).abs().max())
        out[f"copied_at{step}"] = copy.copied_at
        out[f"logits{step}"] = mine
    out["moved"] = float((out.pop("logits1") - out.pop("logits0")).abs().max())
    torch.distributed.destroy_process_group()
    queue.put(out)


def test_gathered_copy_of_a_zero3_lora_policy_gives_the_engines_logits():
    out = spawn_rank(_copy_vs_engine)
    assert out["partitioned"]  # the engine's own parameters are shards (empty on the module) between forwards
    assert out["copied_at0"] == 1 and out["copied_at1"] == 2  # refreshed after each optimizer step
    # LoRA merged (W + alpha/r B A) and copied: the same forward as the engine's, to float32 rounding of the merge
    assert out["diff0"] < 1e-4 and out["diff1"] < 1e-4, out
    assert out["moved"] > 1e-3  # the second refresh brought the second step's weights


@pytest.mark.parametrize(
    "overrides, expected",
    [(["zero=stage3"], True), (["zero=stage2"], False), (["zero=stage3", "step.rollout.gathered_copy=false"], False)],
)
def test_auto_is_on_for_a_zero3_policy(compose, overrides, expected):
    plan = make_plan(compose(["step=grpo", "reward=tiny", *overrides]), CPU)
    assert plan.cfg.step.rollout.gathered_copy is expected


@pytest.mark.parametrize(
    "overrides", [["zero=stage2"], ["zero=stage3", "parallel.tensor=2", "deployment.nproc_per_node=2"]]
)
def test_asking_for_a_copy_that_cannot_help_is_refused(compose, overrides):
    with pytest.raises(ConfigError) as err:
        make_plan(compose(["step=grpo", "reward=tiny", "step.rollout.gathered_copy=true", *overrides]), CPU)
    assert err.value.where == "step.rollout.gathered_copy"
