"""Parallelism and communication: the `parallel` degrees, ZeRO++, the optimizers and the removed 1-bit features.

The planner's rules run in-process on fake hardware; the runs on 2 CPU ranks go through the real CLI and launcher.
(DeepSpeed's parser on every combination: tests/test_config.py::test_ds_config_parallel_optimizer_matrix.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from runner.driver.ds_config import build_ds_config
from runner.driver.plan import make_plan
from runner.errors import ConfigError
from tests.helpers import CPU, GPU, REPO, metrics, run_cli, run_dir_of, summary

CPU2 = ["deployment=cpu", "deployment.nproc_per_node=2"]


def refused(compose, overrides, hw=GPU) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        make_plan(compose(overrides), hw)
    return err.value


# ------------------------------------------------------------------------------------------ degrees and the batch


@pytest.mark.parametrize(
    "tensor, sequence, global_batch, data, gas",
    [(1, 1, 128, 8, 2), (2, 1, 64, 4, 2), (1, 2, 32, 4, 1), (4, 1, 32, 2, 2), (1, 4, 64, 2, 4)],
)
def test_data_degree_is_derived_and_sets_the_batch(compose, tensor, sequence, global_batch, data, gas):
    cfg = compose(
        [
            "deployment=single_node",
            f"parallel.tensor={tensor}",
            f"parallel.sequence={sequence}",
            f"train.global_batch_size={global_batch}",
        ]
    )
    plan = make_plan(cfg, GPU)
    assert plan.cfg.parallel.data == data and plan.cfg.train.gradient_accumulation_steps == gas
    ds = build_ds_config(plan.cfg, plan.world_size, 10, "/run")
    assert ds.get("train_batch_size", 8 * gas * data) == 8 * gas * data == global_batch


@pytest.mark.parametrize(
    "overrides, where, says",
    [
        (["parallel.pipeline=2"], "parallel.pipeline", "PipelineModule"),
        (["parallel.tensor=3"], "parallel.tensor", "does not divide the world size 8"),
        (["parallel.sequence=2", "parallel.data=8"], "parallel.data", "is derived"),
        (["parallel.tensor=2", "parallel.sequence=2"], "parallel.sequence", "choose one"),
        (["parallel.tensor=8"], "parallel.tensor", "4 attention heads"),
        (["parallel.tensor=2", "lora.r=4"], "parallel.tensor", "LoRA"),
        (["parallel.sequence=2", "reward=tiny"], "parallel.sequence", "judge"),
        (["parallel.tensor=2", "step=reward"], "parallel.tensor", "step=reward is not wired"),
        (["parallel.tensor=2", "train.global_batch_size=12"], "train.global_batch_size", "parallel.data"),
        (["parallel.tensor=0"], "parallel.tensor", "positive integer"),
    ],
)
def test_parallel_rejections(compose, overrides, where, says):
    err = refused(compose, ["deployment=single_node", *overrides])
    assert err.where == where and says in err.render()


# ------------------------------------------------------------------------------------------------------------ ZeRO++


def test_zeropp_hpz_auto_is_the_node_on_several_nodes(compose, hostfile):
    plan = make_plan(compose(["zero=stage3_zeropp", "deployment=multi_node", f"deployment.hostfile={hostfile()}"]), GPU)
    assert plan.cfg.zero.zero_hpz_partition_size == 8
    ds = build_ds_config(plan.cfg, plan.world_size, 10, "/run")
    zero = ds["zero_optimization"]
    assert zero["zero_hpz_partition_size"] == 8 and zero["zero_quantized_weights"] and zero["zero_quantized_gradients"]
    assert any("hpz_partition_size=auto: 8" in n for n in plan.notes)


@pytest.mark.parametrize(
    "overrides, hw, where, says",
    [
        (["zero=stage3_zeropp", "zero.stage=2"], GPU, "zero.zero_quantized_weights", "needs ZeRO stage 3"),
        (["zero=stage2", "+zero.zero_quantized_gradients=true"], GPU, "zero.zero_quantized_gradients", "stage 3"),
        (["zero=stage3_zeropp", "zero.zero_hpz_partition_size=3"], GPU, "zero.zero_hpz_partition_size", "divide"),
        (["zero=stage3_zeropp", "zero.zero_hpz_partition_size=16"], GPU, "zero.zero_hpz_partition_size", "divide"),
        (["zero=stage3_zeropp", *CPU2], CPU, "zero.zero_quantized_weights", "not been implemented on CPU"),
        (
            ["zero=stage3_zeropp", "zero.zero_quantized_weights=false", *CPU2],
            CPU,
            "zero.zero_quantized_gradients",
            "CUDA quantizer",
        ),
    ],
)
def test_zeropp_rejections(compose, overrides, hw, where, says):
    err = refused(compose, ["deployment=single_node", *overrides] if hw is GPU else overrides, hw)
    assert err.where == where and says in err.render()


# ------------------------------------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize(
    "overrides, impl",
    [
        (["optimizer=adagrad"], "torch"),
        (["optimizer=muon"], "deepspeed"),
        (["optimizer=lion", "zero=stage2_offload"], "deepspeed"),
        (["optimizer=adagrad", "zero=stage3_offload"], "deepspeed"),
    ],
)
def test_optimizer_impl_on_cpu(compose, overrides, impl):
    assert make_plan(compose([*CPU2, *overrides]), CPU).cfg.optimizer.impl == impl


@pytest.mark.parametrize(
    "overrides, hw, where, says",
    [
        (["optimizer=lamb", *CPU2], CPU, "optimizer", "FusedLamb"),
        (["optimizer=lion", *CPU2], CPU, "optimizer", "zero=stage2_offload"),
        (["optimizer=muon", "optimizer.impl=torch"], GPU, "optimizer.impl", "2-D"),
        (["optimizer=lion", "optimizer.impl=torch"], GPU, "optimizer.impl", "torch.optim has no Lion"),
        (["optimizer=lamb", "zero=stage3_offload"], GPU, "optimizer.name", "no CPU LAMB"),
        (["optimizer=adagrad", "zero=stage2"], GPU, "optimizer", "IndexError"),
        (["optimizer.name=OneBitAdam"], GPU, "optimizer", "ZeRO++"),
        (["+ds.compression_training.weight_quantization.enabled=true"], GPU, "ds.compression_training", "ZeRO++"),
        (["+ds.optimizer.type=ZeroOneAdam"], GPU, "ds.optimizer.type", "0/1 Adam was removed"),
    ],
)
def test_optimizer_rejections(compose, overrides, hw, where, says):
    from runner.driver import ds_check

    cfg = compose(overrides)
    with pytest.raises(ConfigError) as err:
        plan = make_plan(cfg, hw)
        ds_check.check(plan.cfg, {"": build_ds_config(plan.cfg, plan.world_size, 10, "/run")}, raw_keys=True)
    assert err.value.where == where and says in err.value.render()


@pytest.mark.parametrize("arg", ["optimizer=onebit_adam", "optimizer.type=OneBitAdam", "optimizer=onebit_lamb"])
def test_removed_optimizers_on_the_command_line(tmp_path, arg):
    proc = subprocess.run(
        [sys.executable, "-m", "runner", arg, "dry_run=true"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "removed from DeepSpeed" in proc.stderr and "zero=stage3_zeropp" in proc.stderr


def test_multirun_dry_run_sweeps_zero_and_tensor(tmp_path):
    proc = run_cli(
        REPO,
        "-m",
        "dry_run=true",
        "zero=stage2,stage3,stage3_zeropp",
        "parallel.tensor=1,2",
        "deployment=single_node",
        "deployment.plan_gpus_per_node=8",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert proc.stdout.count("plan: sft of") == 6
    configs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/ds_config.json"))]
    assert len(configs) == 6
    assert sorted(c.get("tensor_parallel", {}).get("autotp_size", 1) for c in configs) == [1, 1, 1, 2, 2, 2]
    assert sum("zero_quantized_weights" in c["zero_optimization"] for c in configs) == 2


# ------------------------------------------------------------------------------- end to end on 2 CPU ranks (e2e)


QUICK_PAR = ["debug=quick", "train.max_steps=20", "train.gradient_clipping=0", *CPU2]


def losses(run_dir) -> list[float]:
    return list(metrics(run_dir, "train/loss").values())


@pytest.fixture(scope="module")
def data_parallel_run(tmp_path_factory):
    """The reference: SFT on 2 data-parallel ranks, 4 samples each (global batch 8), no gradient clipping (clipping
    would hide a gradient that is wrong by a constant factor)."""
    cwd = tmp_path_factory.mktemp("dp")
    return run_dir_of(run_cli(cwd, *QUICK_PAR, "train.micro_batch_size=4", f"hydra.run.dir={cwd}/run"))


@pytest.mark.e2e
@pytest.mark.slow  # three 2-rank runs: ~75 s alone on 2 cores
@pytest.mark.parametrize("degree", ["parallel.tensor=2", "parallel.sequence=2"])
def test_model_parallel_matches_data_parallel(tmp_path, data_parallel_run, degree):
    """The same global batch of 8 on one tensor- (AutoTP) or sequence-parallel (Ulysses) group of 2 ranks: the same
    losses as data parallelism. Tolerance 1e-4 relative: the runs differ only in the order of float32 sums (split
    matrix products and all-reduces, ~1e-7 per step); a wrong shard, position or gradient scale moves the loss by
    1e-2 or more within 20 steps."""
    run = run_dir_of(run_cli(tmp_path, *QUICK_PAR, degree, "train.micro_batch_size=8", f"hydra.run.dir={tmp_path}/r"))
    reference, ours = losses(data_parallel_run), losses(run)
    assert len(ours) == len(reference) == 4 and ours[-1] < ours[0] - 1.0
    assert ours == pytest.approx(reference, rel=1e-4)
    assert summary(run)["eval_loss"] == pytest.approx(summary(data_parallel_run)["eval_loss"], rel=1e-4)
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds.get("tensor_parallel", {}).get("autotp_size", 1) * ds.get("sequence_parallel_size", 1) == 2
    assert (run / "export" / "model.safetensors").is_file()


CPU_COMBOS = [  # what DeepSpeed runs on 2 CPU ranks (README "Parallelism and communication")
    *[["zero=" + z, "parallel.tensor=2", "train.micro_batch_size=8"] for z in ("stage1", "stage2", "stage3")],
    *[["zero=" + z, "parallel.sequence=2", "train.micro_batch_size=8"] for z in ("stage1", "stage2", "stage3")],
    [
        "zero=stage3_zeropp",
        "zero.zero_quantized_weights=false",
        "zero.zero_quantized_gradients=false",
        "zero.zero_hpz_partition_size=2",
    ],
    ["optimizer=adagrad", "optimizer.lr=1e-2"],
    ["optimizer=muon"],
]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("overrides", CPU_COMBOS, ids=lambda o: " ".join(o))
def test_cpu_combination_trains(tmp_path, overrides):
    """Each combination trains 10 steps on 2 CPU ranks, evaluates, exports, and its loss falls."""
    run = run_dir_of(
        run_cli(tmp_path, "debug=fdr", "train.max_steps=10", *CPU2, *overrides, f"hydra.run.dir={tmp_path}/r")
    )
    first, last = losses(run)[0], losses(run)[-1]
    assert last < first - 0.5 and (run / "export" / "config.json").is_file()


def test_packing_with_model_parallelism_is_refused(compose):
    for key in ("parallel.tensor=2", "parallel.sequence=2"):
        with pytest.raises(ConfigError) as err:
            make_plan(compose(["deployment=cpu", "deployment.nproc_per_node=2", key, "data.packing=true"]), CPU)
        assert err.value.where == key.split("=")[0] and "data.packing" in err.value.problem
