"""The config tree, the planner, the DeepSpeed JSON and the launcher command, checked against the real parsers.

Everything here runs in-process on fake hardware (runner.driver.plan.Hardware), except the dry runs through the real
CLI at the end, which start in the background as soon as this module's first test runs. Nothing here trains or
launches ranks.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from omegaconf import DictConfig, OmegaConf

from runner import modeling
from runner.driver import launch, memory
from runner.driver.ds_config import build_ds_config
from runner.driver.plan import Hardware, make_plan
from runner.errors import ConfigError
from runner.paths import is_local_path
from tests.helpers import CONF, CPU, GPU, REPO, TINY_TOKENIZER, TINY_TRAIN, ds_parse, fake_exports

RUN = "/runs/sft/2026-01-01_00-00-00"
GiB = 1024**3
TOTAL_STEPS = 100


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


GROUPS = ["step", "model", "data", "zero", "precision", "optimizer", "scheduler", "logger", "deployment", "reward"]
ALL_RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
PIPELINE_RECIPES = [  # step=rlhf: several stages each
    r for r in ALL_RECIPES if {"override /step": "rlhf"} in OmegaConf.load(REPO / "recipes" / f"{r}.yaml").defaults
]
RECIPES = [r for r in ALL_RECIPES if r not in PIPELINE_RECIPES]
PRESETS = options("model")
SIZED_PRESETS = [m for m in PRESETS if OmegaConf.load(CONF / "model" / f"{m}.yaml").get("num_params")]
EXPECTED_WORLD = {"cpu": 1, "single_gpu": 1, "single_node": 8, "auto": 8, "torchrun": 1, "multi_node": 16, "slurm": 16}
SLURM_ENV = {"SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "7"}  # inside an allocation


# ---------------------------------------------------------------------------------------------------------- helpers


def hw_for(cfg: DictConfig) -> Hardware:
    """The fake machine a composed config is meant for: no GPU for the CPU accelerator, 8 GPUs otherwise."""
    return CPU if cfg.deployment.accelerator == "cpu" else GPU


# The fake machine each deployment option is planned on below: torchrun (accelerator=auto) on a CPU-only machine, so
# that both of `auto`'s outcomes are covered (deployment=auto is planned on GPUs).
DEPLOYMENT_HW = {"cpu": CPU, "torchrun": CPU}


def plan_and_build(cfg: DictConfig, hw: Hardware, run_dir: str):
    plan = make_plan(cfg, hw)
    ds = build_ds_config(plan.cfg, plan.world_size, total_steps=TOTAL_STEPS, run_dir=run_dir)
    assert json.loads(json.dumps(ds)) == ds  # the driver writes it as JSON
    return plan, ds, ds_parse(ds, plan.world_size)


def ds_launcher_args(cmd: list[str]):
    from deepspeed.launcher.runner import parse_args

    assert cmd[0] == "deepspeed"
    return parse_args(cmd[1:])


def deepspeed_resolution(cmd: list[str]) -> OrderedDict[str, list[int]]:
    """The slots per host DeepSpeed's launcher (deepspeed.launcher.runner.main) resolves from this command line, with
    every check it makes before it starts a process (no ssh, no subprocess)."""
    from deepspeed.launcher import runner as ds

    args = ds_launcher_args(cmd)
    pool = ds.fetch_hostfile(args.hostfile)
    assert pool, f"DeepSpeed cannot read the hostfile {args.hostfile}"
    if (args.num_nodes >= 0 or args.num_gpus >= 0) and (args.include or args.exclude):
        raise ValueError("Cannot specify num_nodes/gpus with include/exclude")
    active = ds.parse_inclusion_exclusion(pool, args.include, args.exclude)
    active = ds.apply_num_nodes_and_gpus(active, args.num_nodes, args.num_gpus)
    backend = ds.LAUNCHER_CLASSES[args.launcher.lower()]
    backend.validate_active_resources(active)
    if len(active) > 1:  # main() builds the backend (whose __init__ runs validate_args) for multi-node runs only
        backend(args, "") if backend is ds.PDSHRunner else backend(args, "", pool)
    return active


def own_values(group: str, option: str, ignore=()) -> dict:
    """The values an option's YAML file sets itself (no defaults list, interpolations or required markers)."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"), resolve=False)
    return {
        k: v
        for k, v in raw.items()
        if k != "defaults" and k not in ignore and not (isinstance(v, str) and ("${" in v or v == "???"))
    }


def assert_option_selected(cfg: DictConfig, group: str, option: str, ignore=()) -> None:
    node = cfg[group] if group != "data" else cfg.data.sets[option.replace("-", "_")]  # data sets: data.sets.<name>
    composed = OmegaConf.to_container(node, resolve=False)
    expected = own_values(group, option, ignore)
    if group == "deployment" and "deployment" in expected:  # a global-package option (slurm: deployment + hydra)
        expected = {k: v for k, v in expected["deployment"].items() if not (isinstance(v, str) and "${" in v)}
    if group == "step":  # step files are global: the stage's keys under `step`, its training defaults under `train`
        if "train" not in ignore:  # (a recipe's own train keys win over the step's)
            train = {k: v for k, v in expected.get("train", {}).items() if not (isinstance(v, str) and "${" in v)}
            assert {k: cfg.train[k] for k in train} == train
        expected = {k: v for k, v in expected["step"].items() if k not in ignore}
    assert expected, f"conf/{group}/{option}.yaml sets no value to check"
    assert_within(expected, composed)


def assert_within(expected, composed, where: str = "") -> None:
    """Every value an option's file sets is in the composed config (a base the file extends may add more keys)."""
    if isinstance(expected, dict):
        assert isinstance(composed, dict), where
        for k, v in expected.items():
            assert_within(v, composed.get(k), f"{where}.{k}")
    else:
        assert composed == expected, (where, composed, expected)


# ------------------------------------------------------------------------------------- 1. every option composes


def test_every_group_and_recipe_is_discovered():
    defaults = {
        k: v for d in OmegaConf.load(CONF / "config.yaml").defaults if isinstance(d, DictConfig) for k, v in d.items()
    }
    for group in GROUPS:
        chosen = defaults[group] if group != "data" else defaults[group][0]  # data: a list of sets
        assert chosen in options(group), group
    assert RECIPES and sorted(p.stem for p in (CONF / "recipe").glob("*.yaml")) == ALL_RECIPES
    assert "tiny" in PRESETS and set(PRESETS) == set(SIZED_PRESETS)  # planning counts no model
    assert {"stage0", "stage3"} <= set(options("zero")) and {"fp16", "bf16", "fp32"} <= set(options("precision"))


# What an option needs beside itself to make a valid run: a data file, a hostfile, a model with 512 positions.
OPTION_NEEDS = {
    ("data", "local"): lambda hf: [f"data.sets.local.path={TINY_TRAIN}"],
    ("reward", "model"): lambda hf: [f"reward.terms.0.model={fake_exports()[1]}"],
    ("deployment", "multi_node"): lambda hf: [f"deployment.hostfile={hf()}"],
    ("step", "ppo"): lambda hf: [
        f"step.actor_from={fake_exports()[0]}",
        f"step.critic_from={fake_exports()[1]}",
        "step.max_prompt_len=128",
        "step.generation.max_new_tokens=128",
    ],
    **{
        ("step", m): (lambda hf: ["reward=tiny"])
        for m in ("grpo", "rloo", "dr_grpo", "dapo", "reinforce_pp", "self_feedback")
    },
}


def plan_pipeline(compose, base: list[str], pipeline_dir: Path) -> dict:
    """Each stage of a pipeline composed as the pipeline composes it and planned (later stages with their exports
    still to come): stage name -> Plan."""
    from runner.driver.pipeline import stage_overrides, strip_pipeline_keys

    cfg = compose(base)
    assert cfg.step.name == "rlhf"
    plans = {}
    for i, name in enumerate(cfg.step.stages):
        stage_cfg = strip_pipeline_keys(
            compose(stage_overrides(cfg, base, pipeline_dir, name) + (["+step.pending_exports=true"] if i else []))
        )
        assert stage_cfg.step.name == name and "stages" not in stage_cfg.step
        plans[name] = make_plan(stage_cfg, hw_for(stage_cfg))
    return plans


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_plans(compose, hostfile, monkeypatch, group, option):
    if option == "slurm":
        for k, v in SLURM_ENV.items():
            monkeypatch.setenv(k, v)
    needs = OPTION_NEEDS.get((group, option), lambda hf: [])(hostfile)
    cfg = compose([f"{group}={option}", *needs])
    keys = [n.split("=")[0].split(".") for n in needs]  # (a need's key: both its leaf and its top key under the group)
    assert_option_selected(cfg, group, option, ignore=[k[-1] for k in keys] + [k[min(1, len(k) - 1)] for k in keys])
    if (group, option) == ("step", "rlhf"):  # a pipeline: each of its stages is planned (below, for every recipe)
        plans = plan_pipeline(compose, [f"{group}={option}"], Path(tempfile.mkdtemp()))
        assert list(plans) == ["sft", "reward", "ppo"]
        return
    plan = make_plan(cfg, DEPLOYMENT_HW.get(option, GPU) if group == "deployment" else hw_for(cfg))
    for resolved in ("deployment", "precision", "optimizer"):  # every `auto` of these is resolved by the plan
        assert "auto" not in OmegaConf.to_container(plan.cfg[resolved]).values(), resolved
    assert plan.world_size == sum(plan.nodes.values()) >= 1
    if group == "deployment":
        assert plan.world_size == EXPECTED_WORLD[option]


def test_data_local_requires_a_path(compose):
    with pytest.raises(ConfigError) as err:
        make_plan(compose(["data=local"]), GPU)
    assert err.value.where == "data.sets.local.path"


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_plans(compose, recipe):
    cfg = compose([f"recipe={recipe}"])
    raw = OmegaConf.to_container(OmegaConf.load(REPO / "recipes" / f"{recipe}.yaml"), resolve=False)
    overridden = [d for d in raw.get("defaults", []) if isinstance(d, dict)]
    assert overridden, "the recipe overrides no config group"
    for entry in overridden:
        ((key, option),) = entry.items()
        group = key.removeprefix("override ").strip("/")
        ignore = raw.get(group, {}) if group != "step" else ["train"] * ("train" in raw) + list(raw.get("step", {}))
        assert_option_selected(cfg, group, option, ignore=ignore)  # the recipe's own values win
    for section, values in raw.items():  # the recipe's own keys win over the groups'
        if section != "defaults":
            assert_within(values, OmegaConf.to_container(cfg[section]), section)
    plan = make_plan(cfg, hw_for(cfg))
    ds = build_ds_config(plan.cfg, plan.world_size, total_steps=TOTAL_STEPS, run_dir=RUN)
    ds_parse(ds, plan.world_size)
    assert ds["train_micro_batch_size_per_gpu"] == raw["train"]["micro_batch_size"]


@pytest.mark.parametrize("recipe", PIPELINE_RECIPES)
def test_every_pipeline_recipe_plans_all_its_stages(compose, hostfile, recipe, tmp_path):
    """Each stage of a pipeline recipe composes as the pipeline composes it and plans (later stages with their
    exports still to come); the stages' own lists reach them; every engine's JSON passes DeepSpeed's parser."""
    from runner import stages

    base = [f"recipe={recipe}"] + ([f"deployment.hostfile={hostfile()}"] if "multi_node" in recipe else [])
    plans = plan_pipeline(compose, base, tmp_path)
    raw = OmegaConf.load(REPO / "recipes" / f"{recipe}.yaml")
    assert list(plans) == list(raw.step.get("stages") or ["sft", "reward", "ppo"])
    for name, plan in plans.items():
        assert plan.cfg.run_dir == str(tmp_path / name)
        for ds in stages.get(name).engine_configs(plan.cfg, plan.world_size, 10, RUN).values():
            ds_parse(ds, plan.world_size)
        if name in ("ppo", "dpo"):  # the policy starts from the SFT stage's export
            start = plan.cfg.step.actor_from if name == "ppo" else plan.cfg.step.init_from
            assert start == str(tmp_path / "sft" / "export")


def test_recipe_values(compose):
    plan = make_plan(compose(["recipe=sft_tiny_zero3_2ranks"]), CPU)
    assert (plan.world_size, plan.cfg.zero.stage, plan.cfg.deployment.name) == (2, 3, "cpu")
    assert plan.cfg.train.micro_batch_size * plan.world_size == 8
    plan = make_plan(compose(["recipe=sft_opt-1.3b_single_gpu"]), GPU)
    ds = build_ds_config(plan.cfg, plan.world_size, total_steps=TOTAL_STEPS, run_dir=RUN)
    assert (ds["train_batch_size"], ds["zero_optimization"]["stage"], plan.cfg.model.name) == (64, 2, "opt-1.3b")
    assert ds["optimizer"]["params"]["lr"] == 9.65e-6


# ------------------------------------------------------------------------------------- dry_run and `auto` choices


def test_deployment_auto_on_gpus_picks_single_node(compose):
    plan = make_plan(compose([]), GPU)
    assert (plan.cfg.deployment.name, plan.world_size, plan.cfg.precision.dtype) == ("single_node", 8, "bf16")
    assert plan.cfg.optimizer.impl == "deepspeed"
    assert any("single_node" in note for note in plan.notes)


def test_deployment_auto_without_gpus_picks_one_cpu_rank(compose):
    plan = make_plan(compose([]), CPU)
    dep = plan.deployment
    assert (dep.name, dep.accelerator, dep.nproc_per_node, dep.threads_per_rank) == ("cpu", "cpu", 1, 1)
    assert (plan.cfg.precision.dtype, plan.cfg.optimizer.impl, plan.world_size) == ("fp32", "torch", 1)
    assert launch.launcher_command(dep, RUN) == [
        "deepspeed",
        "--num_gpus",
        "1",
        "--master_port",
        str(dep.master_port),
        "--no_local_rank",
        "--module",
        "runner.worker",
        RUN,
    ]


def test_precision_auto_on_gpus_without_bf16_picks_fp16(compose):
    plan = make_plan(compose(["deployment=single_gpu"]), Hardware(cuda_devices=1, bf16=False, cpus=2))
    assert plan.cfg.precision.dtype == "fp16"


@pytest.mark.parametrize("deployment, world", [("single_gpu", 1), ("single_node", 8), ("torchrun", 8)])
def test_gpu_deployment_without_gpus(compose, deployment, world):
    with pytest.raises(ConfigError) as err:
        make_plan(compose([f"deployment={deployment}", "deployment.accelerator=cuda"]), CPU)
    assert err.value.where.startswith("deployment")
    plan = make_plan(compose([f"deployment={deployment}", "deployment.accelerator=cuda", "dry_run=true"]), CPU)
    assert plan.world_size == world  # a dry run plans for the GPUs the config asks for


def test_more_ranks_than_gpus(compose):
    with pytest.raises(ConfigError) as err:
        make_plan(compose(["deployment=single_node", "deployment.nproc_per_node=9"]), GPU)
    assert err.value.where == "deployment.nproc_per_node"


def test_multi_node_without_hostfile(compose, tmp_path):
    missing = f"deployment.hostfile={tmp_path / 'nope'}"
    with pytest.raises(ConfigError) as err:
        make_plan(compose(["deployment=multi_node", missing]), GPU)
    assert err.value.where == "deployment.hostfile"
    plan = make_plan(compose(["deployment=multi_node", missing, "dry_run=true", "deployment.plan_nodes=4"]), GPU)
    assert plan.world_size == 32 and len(plan.nodes) == 4
    assert any("plan_nodes" in note for note in plan.notes)


@pytest.mark.parametrize(
    "overrides, where",
    [
        (["deployment=cpu", "precision=fp16"], "precision"),
        (["zero=stage2", "+zero.offload_param.device=cpu"], "zero.offload_param"),
        (["zero=stage0", "+zero.offload_optimizer.device=cpu"], "zero.offload_optimizer"),
        (["zero=stage2_offload", "optimizer.impl=torch"], "optimizer.impl"),
        (["optimizer.lr=0"], "optimizer.lr"),
        (["train.micro_batch_size=0"], "train.micro_batch_size"),
        (["train.epochs=null"], "train.max_steps"),
        (["data.max_seq_len=512"], "data.max_seq_len"),  # the tiny model has 256 positions
    ],
)
def test_planner_rejections(compose, overrides, where):
    cfg = compose(overrides)
    with pytest.raises(ConfigError) as err:
        make_plan(cfg, hw_for(cfg))
    assert err.value.where == where


# ------------------------------------------------------------- 2. zero × precision × deployment → DeepSpeed's parser

MATRIX_AXES = {"zero": options("zero"), "precision": options("precision"), "deployment": options("deployment")}
# every option of every axis at least once
MATRIX_SAMPLES = [
    tuple(opts[i % len(opts)] for opts in MATRIX_AXES.values()) for i in range(max(map(len, MATRIX_AXES.values())))
]


@pytest.fixture(scope="module")
def matrix_parts(compose, tmp_path_factory):
    """The composed default config and the composed node of every zero, precision and deployment option.

    A combination is the default config with its three group nodes swapped in, which is what Hydra does for these
    independent groups (test_matrix_assembly_is_hydras_composition checks it against Hydra on a sample covering every
    option); composing all 144 through Hydra would take ~20 s.
    """
    hostfile = tmp_path_factory.mktemp("matrix") / "hostfile"
    hostfile.write_text("worker-0 slots=8\nworker-1 slots=8\n")
    needs = {"multi_node": [f"deployment.hostfile={hostfile}"]}
    parts = {
        "base": OmegaConf.to_container(compose([]), resolve=False),
        "overrides": lambda z, p, d: [f"zero={z}", f"precision={p}", f"deployment={d}", *needs.get(d, [])],
    }
    for group, opts in MATRIX_AXES.items():
        for option in opts:
            cfg = compose([f"{group}={option}", *needs.get(option, [])])
            parts[group, option] = OmegaConf.to_container(cfg[group], resolve=False)
    return parts


def assemble(parts: dict, zero: str, precision: str, deployment: str) -> DictConfig:
    cfg = copy.deepcopy(parts["base"])
    cfg.update(
        copy.deepcopy(
            {
                "zero": parts["zero", zero],
                "precision": parts["precision", precision],
                "deployment": parts["deployment", deployment],
            }
        )
    )
    return OmegaConf.create(cfg)


@pytest.mark.parametrize("zero, precision, deployment", MATRIX_SAMPLES)
def test_matrix_assembly_is_hydras_composition(compose, matrix_parts, zero, precision, deployment):
    composed = compose(matrix_parts["overrides"](zero, precision, deployment))
    assembled = assemble(matrix_parts, zero, precision, deployment)
    assert OmegaConf.to_container(assembled, resolve=False) == OmegaConf.to_container(composed, resolve=False)


@pytest.mark.parametrize("deployment", MATRIX_AXES["deployment"])
@pytest.mark.parametrize("precision", MATRIX_AXES["precision"])
@pytest.mark.parametrize("zero", MATRIX_AXES["zero"])
def test_ds_config_matrix(matrix_parts, tmp_path, monkeypatch, zero, precision, deployment):
    if deployment == "slurm":
        for k, v in SLURM_ENV.items():
            monkeypatch.setenv(k, v)
    cfg = assemble(matrix_parts, zero, precision, deployment)
    hw = DEPLOYMENT_HW.get(deployment, GPU)
    accelerator = "cpu" if hw is CPU else "cuda"
    zero_group = matrix_parts["zero", zero]
    if precision == "fp16" and accelerator == "cpu":  # refused by design: DeepSpeed's CPU accelerator has no fp16
        with pytest.raises(ConfigError) as err:
            make_plan(cfg, hw)
        assert err.value.where == "precision"
        return
    if zero.endswith("zeropp") and accelerator == "cpu":  # qwZ/qgZ need DeepSpeed's CUDA quantizer kernels
        with pytest.raises(ConfigError) as err:
            make_plan(cfg, hw)
        assert err.value.where == "zero.zero_quantized_weights"
        return

    plan, ds, parsed = plan_and_build(cfg, hw, str(tmp_path))
    world = plan.world_size
    assert plan.cfg.deployment.accelerator == accelerator
    assert world == EXPECTED_WORLD[deployment]

    # batch: micro × gas × world, and DeepSpeed agrees (its _batch_assertion ran with the real world size)
    assert ds["train_batch_size"] == 8 * 1 * world == parsed.train_batch_size
    assert parsed.train_micro_batch_size_per_gpu == 8 and parsed.gradient_accumulation_steps == 1

    # zero: the group's keys, verbatim
    stage = int(re.match(r"stage(\d)", zero).group(1))
    resolved = {k: ds["zero_optimization"].get(k) for k, v in zero_group.items() if v == "auto"}  # (hpZ: per node)
    assert ds["zero_optimization"] == {**zero_group, **resolved}
    assert parsed.zero_optimization_stage == stage and parsed.zero_enabled == (stage > 0)
    offload = "offload" in zero
    assert (parsed.zero_config.offload_optimizer is not None) == offload
    if offload:
        assert parsed.zero_config.offload_optimizer.device == "cpu"
    assert (parsed.zero_config.offload_param is not None) == (zero == "stage3_offload")

    # precision: one block per dtype
    dtype = precision if precision != "auto" else ("bf16" if accelerator == "cuda" else "fp32")
    assert plan.cfg.precision.dtype == dtype
    if dtype == "fp16":
        assert ds["fp16"] == {
            "enabled": True,
            "auto_cast": False,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
        assert "bf16" not in ds
        assert parsed.float16_config.initial_scale_power == 16 and parsed.float16_config.hysteresis == 2
    elif dtype == "bf16":
        assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    else:
        assert ds["fp16"] == {"enabled": False} and ds["bf16"] == {"enabled": False}
    assert (parsed.float16_config.enabled, parsed.bfloat16_config.enabled) == (dtype == "fp16", dtype == "bf16")

    # optimizer block only when DeepSpeed builds the optimizer: on GPUs, or under ZeRO-Offload (DeepSpeedCPUAdam)
    impl = "deepspeed" if accelerator == "cuda" or offload else "torch"
    assert plan.cfg.optimizer.impl == impl
    if impl == "deepspeed":
        assert ds["optimizer"] == {
            "type": "AdamW",
            "params": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0},
        }
        assert parsed.optimizer_name == "adamw" and parsed.optimizer_params["lr"] == 1e-3
    else:
        assert "optimizer" not in ds and parsed.optimizer_name is None


PARALLEL = [(1, 1), (2, 1), (1, 2)]  # (tensor, sequence)
OPTIMIZERS = options("optimizer")


@pytest.fixture(scope="module")
def optimizer_parts(compose):
    """The composed node of every optimizer option."""
    return {o: OmegaConf.to_container(compose([f"optimizer={o}"]).optimizer, resolve=False) for o in OPTIMIZERS}


def accepted_params(name: str) -> set[str]:
    """The settings the class DeepSpeed 0.19.8 builds for an optimizer block takes (engine._configure_basic_optimizer:
    FusedAdam, torch's Adagrad, FusedLion, FusedLamb; Muon's two halves), read from their signatures."""
    import inspect

    import deepspeed.ops.adam as adam
    import deepspeed.ops.lamb as lamb
    import deepspeed.ops.lion as lion
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine

    if name == "Muon":
        return {*DeepSpeedEngine._MUON_HALF_KEYS, *DeepSpeedEngine._ADAM_HALF_KEYS, "muon_lr", "adam_lr"}
    cls = {"AdamW": adam.FusedAdam, "Adagrad": torch.optim.Adagrad, "Lion": lion.FusedLion, "LAMB": lamb.FusedLamb}
    return set(inspect.signature(cls[name].__init__).parameters) - {"self", "params"}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("tensor, sequence", PARALLEL)
@pytest.mark.parametrize("zero", MATRIX_AXES["zero"])
def test_ds_config_parallel_optimizer_matrix(matrix_parts, optimizer_parts, zero, tensor, sequence, optimizer):
    """Every zero option x parallel degrees x optimizer on a node of 8 GPUs: the JSON passes DeepSpeed's own parser
    at the real world size, with its batch, parallel and optimizer blocks; what cannot run is refused by the plan."""
    cfg = assemble(matrix_parts, zero, "bf16", "single_node")
    cfg.optimizer = OmegaConf.create(copy.deepcopy(optimizer_parts[optimizer]))
    cfg.parallel.tensor, cfg.parallel.sequence = tensor, sequence
    name = cfg.optimizer.name
    if "offload" in zero and name not in ("AdamW", "Adagrad", "Lion"):  # DeepSpeed has no CPU LAMB or Muon
        with pytest.raises(ConfigError, match="ZeRO-Offload") as err:
            make_plan(cfg, GPU)
        assert err.value.where == "optimizer.name"
        return
    if name == "Adagrad" and zero in ("stage1", "stage2"):  # DeepSpeed 0.19.8 fails at its first step
        with pytest.raises(ConfigError, match="_get_flat_partition_unpadded"):
            make_plan(cfg, GPU)
        return
    plan = make_plan(cfg, GPU)
    ds = build_ds_config(plan.cfg, plan.world_size, total_steps=TOTAL_STEPS, run_dir=RUN)
    data = 8 // (tensor * sequence)
    assert plan.cfg.parallel.data == data
    assert ds["train_batch_size"] == 8 * data  # micro x accumulation x data-parallel ranks
    assert ds.get("sequence_parallel_size", 1) == sequence
    # the ranks hand DeepSpeed AutoTP's groups (runner.train.parallel.prepare): its parse counts the data-parallel
    # ranks; Ulysses' sequence_parallel_size divides the world in the parse itself
    parsed = ds_parse(ds, 8 // tensor)
    assert parsed.train_batch_size == 8 * data
    assert parsed.tensor_parallel_config.autotp_size == (tensor if tensor > 1 else 0)
    assert parsed.zero_optimization_stage == int(zero[5])
    if zero == "stage3_zeropp":  # one node: hpZ resolved off; the quantized collectives on
        zc = parsed.zero_config
        assert zc.zero_quantized_weights and zc.zero_quantized_gradients and zc.zero_hpz_partition_size == 1
    block = ds["optimizer"]
    assert block["type"] == name and parsed.optimizer_name == name.lower()
    assert set(block["params"]) <= accepted_params(name), name


def test_ds_parser_has_teeth(compose):
    """The parse checks above can fail: a batch built for another world size and a misspelt zero key are refused."""
    plan, ds, _ = plan_and_build(compose(["deployment=single_node"]), GPU, RUN)
    with pytest.raises(AssertionError, match="train_batch_size is not equal"):
        ds_parse(ds, plan.world_size * 2)
    plan, ds, _ = plan_and_build(compose(["zero=stage2"]), GPU, RUN)
    ds["zero_optimization"]["reduce_bucket_sise"] = 1
    with pytest.raises(Exception, match="reduce_bucket_sise"):
        ds_parse(ds, plan.world_size)


@pytest.mark.parametrize(
    "impl, deployment, present",
    [
        ("torch", "single_node", False),
        ("deepspeed", "cpu", True),
        ("auto", "single_node", True),
        ("auto", "cpu", False),
    ],
)
def test_optimizer_block_follows_impl(compose, impl, deployment, present):
    cfg = compose(
        [f"optimizer.impl={impl}", f"deployment={deployment}", "optimizer.lr=3e-4", "optimizer.weight_decay=0.1"]
    )
    plan, ds, parsed = plan_and_build(cfg, hw_for(cfg), RUN)
    assert ("optimizer" in ds) == present
    if present:
        assert ds["optimizer"]["params"]["lr"] == 3e-4 and ds["optimizer"]["params"]["weight_decay"] == 0.1
        assert parsed.optimizer_params["weight_decay"] == 0.1


SCHEDULER_TYPES = {"cosine": "WarmupCosineLR", "linear": "WarmupDecayLR", "constant": "WarmupLR"}


@pytest.mark.parametrize(
    "name, warmup, warmup_steps",
    [
        pytest.param(name, warmup, steps)
        for name in options("scheduler")
        for warmup, steps in [(["scheduler.warmup_steps=10"], 10), (["scheduler.warmup_ratio=0.05"], 5), ([], 0)]
    ],
)
def test_scheduler_block(compose, name, warmup, warmup_steps):
    import torch
    from deepspeed.runtime import lr_schedules

    plan, ds, parsed = plan_and_build(compose([f"scheduler={name}", "deployment=single_node", *warmup]), GPU, RUN)
    sched = ds["scheduler"]
    assert sched["type"] == SCHEDULER_TYPES[name] == parsed.scheduler_name
    params = sched["params"]
    assert params["warmup_num_steps"] == max(1, warmup_steps)
    assert params.get("total_num_steps") == (None if name == "constant" else TOTAL_STEPS)

    # DeepSpeed's own scheduler class takes these params and runs them over the whole run
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=plan.cfg.optimizer.lr)
    scheduler = getattr(lr_schedules, sched["type"])(opt, **params)
    lrs = []
    for _ in range(TOTAL_STEPS):
        scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert max(lrs) == pytest.approx(1e-3, rel=1e-3)
    if warmup_steps:
        assert lrs[0] < 0.5e-3 and lrs.index(max(lrs)) >= warmup_steps - 1
    else:  # no warmup: full lr at once (DeepSpeed's WarmupLR/WarmupDecayLR ramp over at least 2 steps)
        assert max(lrs[:3]) == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-3) if name == "constant" else lrs[-1] < 0.05e-3


@pytest.mark.parametrize("name", ["none", "tensorboard", "csv", "wandb"])
def test_no_deepspeed_monitor_whatever_the_logger(compose, tmp_path, name):
    """The runner logs to the trackers itself on the optimizer-step axis; DeepSpeed's monitor (its learning rate on a
    sample-count axis) stays off, so that wandb sees one monotonic step."""
    plan, ds, parsed = plan_and_build(compose([f"logger={name}"]), GPU, str(tmp_path))
    assert not {"tensorboard", "csv_monitor", "wandb", "comet"} & set(ds)
    for key in ("tensorboard", "csv_monitor", "wandb"):
        assert not getattr(parsed.monitor_config, key).enabled, key
    assert plan.cfg.logger.name == name


@pytest.mark.parametrize("zero", ["stage0", "stage2"])
def test_ds_escape_hatch(compose, zero):
    cfg = compose(
        [
            f"zero={zero}",
            "deployment=single_node",
            "+ds.zero_optimization.reduce_bucket_size=5e8",
            "+ds.activation_checkpointing.partition_activations=true",
            "+ds.steps_per_print=7",
        ]
    )
    plan, ds, parsed = plan_and_build(cfg, GPU, RUN)
    zero_group = OmegaConf.to_container(cfg.zero)
    assert ds["zero_optimization"] == {**zero_group, "reduce_bucket_size": 5e8}  # merged into, not replacing, the group
    assert ds["activation_checkpointing"] == {"partition_activations": True}
    assert ds["steps_per_print"] == 7  # merged last: wins over train.steps_per_print
    assert parsed.zero_config.reduce_bucket_size == 500_000_000
    assert parsed.activation_checkpointing_config.partition_activations is True
    assert parsed.steps_per_print == 7


def test_ds_top_level_keys_trace_to_train(compose):
    cfg = compose(
        [
            "deployment=single_node",
            "train.micro_batch_size=2",
            "train.gradient_accumulation_steps=3",
            "train.gradient_clipping=0.5",
            "train.steps_per_print=11",
            "train.wall_clock_breakdown=true",
        ]
    )
    plan, ds, parsed = plan_and_build(cfg, GPU, RUN)
    assert {
        k: ds[k]
        for k in (
            "train_batch_size",
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "gradient_clipping",
            "steps_per_print",
            "wall_clock_breakdown",
        )
    } == {
        "train_batch_size": 48,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 3,
        "gradient_clipping": 0.5,
        "steps_per_print": 11,
        "wall_clock_breakdown": True,
    }
    assert (parsed.train_batch_size, parsed.gradient_clipping, parsed.wall_clock_breakdown) == (48, 0.5, True)


# ------------------------------------------------------------------------- 3. global batch size → gradient accumulation


@pytest.mark.parametrize(
    "overrides, hw, global_batch, micro, gas",
    [
        (["deployment=single_node"], GPU, 64, 4, 2),
        (["deployment=single_node", "train.gradient_accumulation_steps=5"], GPU, 64, 4, 2),  # derived value wins
        (["deployment=cpu", "deployment.nproc_per_node=2"], CPU, 16, 4, 2),
        (["deployment=single_gpu"], GPU, 64, 8, 8),
        ("multi_node", GPU, 256, 4, 4),
    ],
)
def test_global_batch_size_derives_accumulation(compose, hostfile, overrides, hw, global_batch, micro, gas):
    if overrides == "multi_node":
        overrides = ["deployment=multi_node", f"deployment.hostfile={hostfile()}"]
    cfg = compose([*overrides, f"train.global_batch_size={global_batch}", f"train.micro_batch_size={micro}"])
    plan, ds, parsed = plan_and_build(cfg, hw, RUN)
    assert plan.cfg.train.gradient_accumulation_steps == gas == ds["gradient_accumulation_steps"]
    assert ds["train_batch_size"] == global_batch == parsed.train_batch_size
    assert parsed.gradient_accumulation_steps == gas


@pytest.mark.parametrize("global_batch", [60, 16, 33])
def test_global_batch_size_must_divide(compose, global_batch):
    cfg = compose(["deployment=single_node", f"train.global_batch_size={global_batch}", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError) as err:
        make_plan(cfg, GPU)
    assert err.value.where == "train.global_batch_size"
    assert "train.global_batch_size" in str(err.value) and "32" in str(err.value)  # 4 × 8 GPUs


# ------------------------------------------------------------------------------------------------ 4. launcher commands


def assert_deepspeed_args(cmd: list[str], **expected):
    args = ds_launcher_args(cmd)
    assert (args.user_script, args.user_args, args.module, args.no_local_rank) == ("runner.worker", [RUN], True, True)
    for key, value in expected.items():
        assert getattr(args, key) == value, key
    return args


def test_cpu_command(compose):
    plan = make_plan(compose(["deployment=cpu", "deployment.nproc_per_node=2"]), CPU)
    port = plan.deployment.master_port
    assert isinstance(port, int) and 0 < port < 65536
    cmd = launch.launcher_command(plan.deployment, RUN)
    assert cmd == f"deepspeed --num_gpus 2 --master_port {port} --no_local_rank --module runner.worker {RUN}".split()
    assert_deepspeed_args(cmd, num_gpus=2, master_port=port, hostfile="/job/hostfile", include="")
    assert launch.worker_env(plan.deployment) == {
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    assert plan.world_size == 2


def test_cpu_omp_wait_policy(compose):
    """One CPU rank with every core: its idle OpenMP threads sleep (deployment.omp_wait_policy); null leaves
    OpenMP's default; single-threaded ranks have no OpenMP team to wait."""
    one = launch.worker_env(make_plan(compose(["deployment=cpu", "model=opt-125m"]), CPU).deployment)
    assert one["OMP_NUM_THREADS"] == str(CPU.cpus) and one["OMP_WAIT_POLICY"] == "PASSIVE"
    off = make_plan(compose(["deployment=cpu", "model=opt-125m", "deployment.omp_wait_policy=null"]), CPU).deployment
    assert "OMP_WAIT_POLICY" not in launch.worker_env(off)
    tiny = launch.worker_env(make_plan(compose(["deployment=cpu"]), CPU).deployment)
    assert tiny["OMP_NUM_THREADS"] == "1" and "OMP_WAIT_POLICY" not in tiny


GROWN = [  # the tiny model at 13M parameters, counted from its architecture (no preset figure)
    "model.arch.hidden_size=512",
    "model.arch.word_embed_proj_dim=512",
    "model.arch.ffn_dim=2048",
    "model.arch.num_hidden_layers=4",
    "model.num_params=null",
    "model.largest_layer_params=null",
]


def test_cpu_threads_auto_follow_the_models_size(compose):
    """deployment.threads_per_rank=auto on CPU ranks: one thread for a model under 3M parameters (the tiny model
    trained 1.3-1.5x faster on one thread than on two), the rank's share of the cores for a bigger one (counted from
    its preset, or from its architecture); a number is kept; GPU ranks keep torch's default."""
    tiny = make_plan(compose(["deployment=cpu"]), CPU)
    assert tiny.deployment.threads_per_rank == 1
    assert [n for n in tiny.notes if "threads_per_rank=auto chose 1" in n and "560,896 parameters" in n]
    for big in (["model=opt-125m"], GROWN):
        plan = make_plan(compose(["deployment=cpu", *big]), CPU)
        assert plan.deployment.threads_per_rank == CPU.cpus and not [n for n in plan.notes if "threads_per" in n]
    assert make_plan(compose(["deployment=cpu", "deployment.threads_per_rank=2"]), CPU).deployment.threads_per_rank == 2
    wide = Hardware(cuda_devices=0, bf16=False, cpus=16)
    two = make_plan(compose(["deployment=cpu", "deployment.nproc_per_node=2", *GROWN]), wide)
    assert two.deployment.threads_per_rank == 8
    assert make_plan(compose([]), GPU).deployment.threads_per_rank is None
    for bad in ("abc", "0", "-2", "1.5", "true"):
        with pytest.raises(ConfigError) as err:
            make_plan(compose(["deployment=cpu", f"deployment.threads_per_rank={bad}"]), CPU)
        assert err.value.where == "deployment.threads_per_rank" and "positive" in str(err.value)


def test_cpu_ranks_beyond_cores(compose):
    with pytest.raises(ConfigError) as err:
        make_plan(compose(["deployment=cpu", "deployment.nproc_per_node=3"]), CPU)
    assert err.value.where == "deployment.nproc_per_node"


@pytest.mark.parametrize(
    "overrides, gpus, flags",
    [
        (["deployment=single_gpu"], 1, ["--num_gpus", "1"]),
        (
            ["deployment=single_node"],
            8,
            [],
        ),  # every visible GPU: no --num_gpus, so DeepSpeed honours CUDA_VISIBLE_DEVICES
        (["deployment=single_node", "deployment.nproc_per_node=4"], 4, ["--num_gpus", "4"]),
        (["deployment=single_node", "deployment.include='localhost:0,2'"], 2, ["--include", "localhost:0,2"]),
        (["deployment=auto"], 8, []),
    ],
)
def test_single_node_commands(compose, overrides, gpus, flags):
    plan = make_plan(compose([*overrides, "deployment.master_port=29555"]), GPU)
    cmd = launch.launcher_command(plan.deployment, RUN)
    assert cmd == ["deepspeed", *flags, "--master_port", "29555", "--no_local_rank", "--module", "runner.worker", RUN]
    assert_deepspeed_args(cmd, num_gpus=gpus if flags[:1] == ["--num_gpus"] else -1, master_port=29555)
    env = launch.worker_env(plan.deployment)
    assert env["DS_ACCELERATOR"] == "cuda" and "OMP_NUM_THREADS" not in env
    assert plan.world_size == gpus


def _multi_node(compose, hostfile, launcher="pdsh", master_addr="worker-0", **settings):
    hf = hostfile()
    overrides = ["deployment=multi_node", f"deployment.hostfile={hf}", f"deployment.multinode_launcher={launcher}"]
    if master_addr:
        overrides.append(f"deployment.master_addr={master_addr}")
    overrides += [f"deployment.{k}='{v}'" if isinstance(v, str) else f"deployment.{k}={v}" for k, v in settings.items()]
    plan = make_plan(compose(overrides), GPU)
    return plan, hf, launch.launcher_command(plan.deployment, RUN)


@pytest.mark.parametrize("launcher", ["pdsh", "openmpi", "mvapich", "slurm"])
@pytest.mark.parametrize("master_addr", ["worker-0", None])
def test_multi_node_command(compose, hostfile, launcher, master_addr):
    plan, hf, cmd = _multi_node(compose, hostfile, launcher, master_addr)
    addr = ["--master_addr", master_addr] if master_addr else []
    assert cmd == ["deepspeed", "--hostfile", hf, "--launcher", launcher, *addr] + (
        f"--master_port 29500 --no_local_rank --module runner.worker {RUN}".split()
    )
    assert_deepspeed_args(cmd, hostfile=hf, launcher=launcher, master_addr=master_addr or "", master_port=29500)
    assert plan.world_size == 16 and plan.nodes == {"worker-0": 8, "worker-1": 8}
    assert plan.deployment.nproc_per_node == 8
    active = deepspeed_resolution(cmd)
    assert {h: len(s) for h, s in active.items()} == plan.nodes


@pytest.mark.parametrize(
    "launcher, settings, flags, nodes",
    [
        (
            "pdsh",
            {"include": "worker-0:0,1@worker-1"},
            ["--include", "worker-0:0,1@worker-1"],
            {"worker-0": 2, "worker-1": 8},
        ),
        ("pdsh", {"exclude": "worker-1:0,1"}, ["--exclude", "worker-1:0,1"], {"worker-0": 8, "worker-1": 6}),
        ("pdsh", {"exclude": "worker-0"}, ["--exclude", "worker-0"], {"worker-1": 8}),
        ("pdsh", {"num_nodes": 1}, ["--num_nodes", "1"], {"worker-0": 8}),
        ("pdsh", {"num_gpus": 4}, ["--num_gpus", "4"], {"worker-0": 4, "worker-1": 4}),
        ("pdsh", {"num_nodes": 1, "num_gpus": 2}, ["--num_nodes", "1", "--num_gpus", "2"], {"worker-0": 2}),
        ("slurm", {"include": "worker-1"}, ["--include", "worker-1"], {"worker-1": 8}),
        (
            "slurm",
            {"num_gpus": 4, "launcher_args": "--partition gpu --time 01:00:00"},
            ["--launcher_args=--partition gpu --time 01:00:00", "--num_gpus", "4"],
            {"worker-0": 4, "worker-1": 4},
        ),
        (
            "openmpi",
            {"launcher_args": "--mca btl_tcp_if_include eth0"},
            ["--launcher_args=--mca btl_tcp_if_include eth0"],
            {"worker-0": 8, "worker-1": 8},
        ),
    ],
)
def test_multi_node_filters(compose, hostfile, launcher, settings, flags, nodes):
    plan, hf, cmd = _multi_node(compose, hostfile, launcher, **settings)
    assert cmd == ["deepspeed", "--hostfile", hf, "--launcher", launcher, *flags] + (
        f"--master_addr worker-0 --master_port 29500 --no_local_rank --module runner.worker {RUN}".split()
    )
    args = assert_deepspeed_args(
        cmd,
        launcher=launcher,
        launcher_args=settings.get("launcher_args", ""),
        include=settings.get("include", ""),
        exclude=settings.get("exclude", ""),
        num_nodes=settings.get("num_nodes", -1),
        num_gpus=settings.get("num_gpus", -1),
    )
    assert args.hostfile == hf
    assert plan.nodes == nodes and plan.world_size == sum(nodes.values())
    active = deepspeed_resolution(cmd)  # the world DeepSpeed's launcher would start is the one planned
    assert {h: len(s) for h, s in active.items()} == plan.nodes


def test_multi_node_include_and_exclude_are_exclusive(compose, hostfile):
    with pytest.raises(ConfigError) as err:
        _multi_node(compose, hostfile, include="worker-0", exclude="worker-1:0")
    assert err.value.where == "deployment" and "exclusive" in err.value.problem


@pytest.mark.parametrize("settings", [{"include": "worker-9"}, {"exclude": "worker-0@worker-1"}])
def test_multi_node_filter_errors(compose, hostfile, settings):
    with pytest.raises(ConfigError):
        _multi_node(compose, hostfile, **settings)


@pytest.mark.parametrize(
    "launcher, settings",
    [
        ("pdsh", {"include": "worker-0:9"}),  # no slot 9: planned as world size 0
        ("pdsh", {"include": "worker-1", "num_nodes": 1}),  # DeepSpeed: num_nodes/num_gpus exclude include/exclude
        ("openmpi", {"exclude": "worker-1:0"}),  # openmpi: no include/exclude at all
        ("mvapich", {"num_gpus": 4}),  # mvapich: no num_nodes/num_gpus
        ("slurm", {"include": "worker-0:0,1@worker-1"}),  # slurm: same slot count on every host
    ],
)
def test_planner_rejects_what_the_deepspeed_launcher_rejects(compose, hostfile, launcher, settings):
    try:
        plan, _, cmd = _multi_node(compose, hostfile, launcher, **settings)
    except ConfigError:
        return  # refused up front, with a fix: what a user needs
    try:
        deepspeed_resolution(cmd)
    except (ValueError, SystemExit):
        pass
    else:
        raise AssertionError(f"premise of this case is wrong: DeepSpeed's launcher accepts {cmd}")
    pytest.fail(f"planned world size {plan.world_size} for {cmd[1:-4]}, which DeepSpeed's launcher refuses")


@pytest.mark.parametrize("value", ["--exclusive", "--partition=gpu"])
def test_launcher_args_that_look_like_options(compose, hostfile, value):
    _, _, cmd = _multi_node(compose, hostfile, "slurm", launcher_args=value)
    assert ds_launcher_args(cmd).launcher_args == value


def _torchrun(cmd: list[str], monkeypatch):
    import torch.distributed.run as torchrun

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # config_from_args sets it in os.environ when unset
    assert cmd[0] == "torchrun"
    args = torchrun.get_args_parser().parse_args(cmd[1:])
    assert (args.module, args.training_script, args.training_script_args) == (True, "runner.worker", [RUN])
    config, program, program_args = torchrun.config_from_args(args)
    assert program == sys.executable and program_args[-3:] == ["-m", "runner.worker", RUN]
    return args, config


@pytest.mark.parametrize("hw, nproc, accelerator", [(GPU, 8, "cuda"), (CPU, 1, "cpu")])
def test_torchrun_single_node(compose, monkeypatch, hw, nproc, accelerator):
    plan = make_plan(compose(["deployment=torchrun"]), hw)
    cmd = launch.launcher_command(plan.deployment, RUN)
    assert cmd == f"torchrun --standalone --nnodes 1 --nproc_per_node {nproc} -m runner.worker {RUN}".split()
    args, config = _torchrun(cmd, monkeypatch)
    assert args.standalone is True
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (1, 1, nproc)
    assert plan.world_size == nproc and launch.worker_env(plan.deployment)["DS_ACCELERATOR"] == accelerator


def test_torchrun_multi_node(compose, monkeypatch):
    cfg = compose(["deployment=torchrun", "deployment.nnodes=2", "deployment.rdzv_endpoint='host:29400'"])
    plan = make_plan(cfg, GPU)
    cmd = launch.launcher_command(plan.deployment, RUN)
    assert (
        cmd
        == (
            f"torchrun --nnodes 2 --rdzv_backend c10d --rdzv_endpoint host:29400 --rdzv_id runner "
            f"--nproc_per_node 8 -m runner.worker {RUN}"
        ).split()
    )
    args, config = _torchrun(cmd, monkeypatch)
    assert args.standalone is False
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 8)
    assert (config.rdzv_backend, config.rdzv_endpoint, config.run_id) == ("c10d", "host:29400", "runner")
    assert plan.world_size == 16


def test_torchrun_multi_node_needs_an_endpoint(compose):
    with pytest.raises(ConfigError) as err:
        make_plan(compose(["deployment=torchrun", "deployment.nnodes=2"]), GPU)
    assert err.value.where == "deployment.rdzv_endpoint"


def test_parse_hostfile_matches_deepspeed(tmp_path):
    from deepspeed.launcher.runner import _parse_hostfile

    text = "# the cluster\nworker-0 slots=8   # first node\n\n  worker-1 slots=4\n"
    path = tmp_path / "hostfile"
    path.write_text(text)
    hosts = launch.parse_hostfile(str(path))
    assert hosts == OrderedDict([("worker-0", 8), ("worker-1", 4)])
    assert list(hosts.items()) == list(_parse_hostfile(text.splitlines(keepends=True)).items())


def test_parse_hostfile_missing(tmp_path):
    with pytest.raises(ConfigError) as err:
        launch.parse_hostfile(str(tmp_path / "missing"))
    assert err.value.where == "deployment.hostfile" and "missing" in err.value.problem


@pytest.mark.parametrize(
    "text",
    [
        "worker-0 8\n",
        "worker-0 slots=eight\n",
        "worker-0\n",
        "worker-0 slots=8\nworker-0 slots=8\n",
        "# nothing\n\n",
        "",
    ],
)
def test_parse_hostfile_bad(tmp_path, text):
    from deepspeed.launcher.runner import _parse_hostfile

    path = tmp_path / "hostfile"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        launch.parse_hostfile(str(path))
    assert err.value.where == "deployment.hostfile"
    with pytest.raises(ValueError):  # DeepSpeed's launcher refuses the same file
        _parse_hostfile(text.splitlines(keepends=True))


# ------------------------------------------------------------------------------------------------- 5. model presets


@pytest.mark.parametrize("name", SIZED_PRESETS)
def test_model_preset_sizes(compose, hf_offline, name):
    import torch
    from transformers import AutoModelForCausalLM

    model = compose([f"model={name}"]).model
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(modeling.arch_config(model))
    assert sum(p.numel() for p in net.parameters()) == model.num_params
    assert modeling.largest_layer(model) == model.largest_layer_params
    assert model.largest_layer_params == max(sum(p.numel() for p in m.parameters(recurse=False)) for m in net.modules())
    if name != "tiny":  # (the tiny model is built from its architecture, with the shipped tokenizer)
        assert "/" in model.path and not is_local_path(model.path)  # a hub id, not a directory
        assert model.tokenizer == model.path and model.name == name


def test_tiny_model_matches_the_shipped_tokenizer(compose, hf_offline):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = compose(["model=tiny"]).model
    assert model.path is None and Path(model.tokenizer) == TINY_TOKENIZER
    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))
    assert model.arch.vocab_size == len(tok) == len(modeling.load_tokenizer(model))
    config = modeling.model_config(model, tok)
    assert config.vocab_size == len(tok) and config.dropout == 0.0
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    assert modeling.count_params(model, tok) == sum(p.numel() for p in net.parameters())


def test_tokenizer_larger_than_the_vocabulary_is_refused(compose, hf_offline):
    from transformers import AutoTokenizer

    model = compose(["model=tiny", "model.arch.vocab_size=512"]).model
    with pytest.raises(ConfigError) as err:
        modeling.model_config(model, AutoTokenizer.from_pretrained(str(TINY_TOKENIZER)))
    assert err.value.where == "model.tokenizer"


# --------------------------------------------------------------------------------------------------- 6. memory plan


def _memory(compose, zero: str, deployment: str, model: str = "opt-1.3b") -> dict:
    plan = make_plan(compose([f"model={model}", f"zero={zero}", f"deployment={deployment}"]), GPU)
    m = plan.cfg.model
    return memory.model_state_memory(
        plan.cfg, m.num_params, m.largest_layer_params, max(plan.nodes.values()), len(plan.nodes)
    )


def test_memory_opt_1_3b_matches_deepspeed_figures(compose):
    params, largest = 1315758080, 102957056
    stage2 = _memory(compose, "stage2", "single_gpu")
    assert stage2["devices"] == 1 and stage2["num_params"] == params
    assert stage2["per_device_gb"] == pytest.approx(24.5, abs=0.05)
    assert stage2["per_device_gb"] == pytest.approx((4 * params + 16 * params) / GiB)  # fp16 p+g, 16 B/N states
    stage3 = _memory(compose, "stage3", "single_node")
    assert stage3["devices"] == 8
    assert stage3["per_device_gb"] == pytest.approx(3.1, abs=0.05)
    assert stage3["per_device_gb"] == pytest.approx((4 * largest + 18 * params / 8) / GiB, rel=1e-6)


@pytest.mark.parametrize(
    "params, largest, gpus, nodes",
    [(1315758080, 102957056, 1, 1), (6738415616, 131072000, 8, 2), (560896, 131072, 2, 1)],
)
@pytest.mark.parametrize("offload_optimizer, offload_params", [(False, False), (True, False), (True, True)])
def test_memory_formulas_are_deepspeeds(params, largest, gpus, nodes, offload_optimizer, offload_params):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cpu, dev, _ = estimate_zero3_model_states_mem_needs(
        params, largest, gpus, nodes, cpu_offload=offload_optimizer, cpu_offload_params=offload_params
    )
    assert memory.zero3_model_states(params, largest, gpus, nodes, offload_optimizer, offload_params) == (cpu, dev)
    cpu, dev = estimate_zero2_model_states_mem_needs(params, gpus, nodes, cpu_offload=offload_optimizer)
    assert memory.zero2_model_states(params, gpus, nodes, offload_optimizer) == (cpu, dev)


def test_memory_falls_with_the_stage_and_with_offload(compose):
    per_device = {z: _memory(compose, z, "single_node") for z in options("zero")}
    gb = {z: m["per_device_gb"] for z, m in per_device.items()}
    assert gb["stage3"] < gb["stage2"] < gb["stage1"] < gb["stage0"]
    assert gb["stage2_offload"] < gb["stage2"] and gb["stage3_offload"] < gb["stage3"]
    assert per_device["stage3_offload"]["per_node_cpu_gb"] > per_device["stage3"]["per_node_cpu_gb"]
    one_gpu = _memory(compose, "stage3", "single_gpu")["per_device_gb"]
    assert gb["stage3"] < one_gpu  # ZeRO-3 shards over the 8 GPUs
    assert _memory(compose, "stage0", "single_gpu")["per_device_gb"] == pytest.approx(gb["stage0"])  # nothing sharded


def test_memory_plans_every_engine_of_a_run(compose):
    """DPO's frozen reference on top of the policy: its 16-bit weights, all of them without ZeRO-3, a 1/N partition and
    the largest layer with it, on the CPU when offloaded; with LoRA (adapters off) there is no reference engine."""
    from runner.driver.ds_config import inference_config
    from runner.stages.dpo.spec import DPO

    params, largest = 1315758080, 102957056
    cfg = make_plan(compose(["step=dpo", "model=opt-1.3b", "zero=stage2", "deployment=single_node"]), GPU).cfg
    sizes = {"": (params, largest)}
    policy = memory.model_state_memory(cfg, params, largest, 8, 1)["per_device_gb"]
    for stage, offload, device_gb, cpu_gb in [
        (0, False, 2 * params / GiB, 0),
        (3, False, (2 * params / 8 + 2 * largest) / GiB, 0),
        (3, True, 2 * largest / GiB, 2 * params / GiB),
    ]:
        configs = {
            "": DPO().engine_configs(cfg, 8, 10, "/tmp/x")[""],
            "reference": inference_config(cfg, 8, 4, stage, offload),
        }
        m = memory.run_memory(cfg, configs, sizes, 8, 1)
        ref = m["engines"]["reference"]
        assert not ref["trained"] and ref["num_params"] == params
        assert ref["per_device_gb"] == pytest.approx(device_gb) and ref["per_node_cpu_gb"] == pytest.approx(cpu_gb)
        assert m["per_device_gb"] == pytest.approx(policy + device_gb)
    lora = make_plan(compose(["step=dpo", "model=opt-1.3b", "lora.r=8", "deployment=single_node"]), GPU).cfg
    assert set(DPO().engine_configs(lora, 8, 10, "/tmp/x")) == {""}  # the reference is the policy, adapters off


# ----------------------------------------------------------------------------- 7. dry run through the real CLI


@pytest.fixture(scope="module", autouse=True)
def cli_dry_runs(request, tmp_path_factory):
    """Start the CLI dry runs this session selected in the background, two at a time, as soon as this module starts:
    each takes seconds of interpreter start-up, which overlaps with the in-process tests."""
    wanted = sorted(
        {
            item.callspec.params["preset"]
            for item in request.session.items
            if getattr(item, "module", None) is request.module
            and hasattr(item, "callspec")
            and "preset" in item.callspec.params
        }
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # a snapshot: tests below may change os.environ meanwhile

    cwds = {name: tmp_path_factory.mktemp(f"cli-{name}") for name in wanted}  # made here, not in the threads

    def dry_run(name: str):
        cwd = cwds[name]
        proc = subprocess.run(
            [sys.executable, "-m", "runner", f"model={name}", "dry_run=true", "deployment=single_gpu"],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        return proc, cwd

    pool = ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(dry_run, name) for name in wanted}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def _section(out: str, title: str) -> str:
    return out.split(f"# {title}\n", 1)[1].split("\n\n# ", 1)[0]


@pytest.mark.parametrize("preset", PRESETS)
def test_dry_run_cli(cli_dry_runs, preset):
    """A dry run prints a summary (the verdict, the biggest terms, the time estimate, the launcher command) and writes
    the recipe, the DeepSpeed JSON and the breakdown into its run directory."""
    proc, cwd = cli_dry_runs[preset].result(timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    for marker in ("plan: sft of", "memory per device:", "biggest:", "time (an estimate", "launch: ", "plan files: "):
        assert marker in out
    assert len(out.splitlines()) < 20  # a summary, not the recipe

    words = next(line for line in out.splitlines() if line.startswith("launch: ")).split()[1:]
    at = words.index("deepspeed")
    env, cmd = dict(w.split("=", 1) for w in words[:at]), words[at:]
    assert env["DS_ACCELERATOR"] == "cuda"
    run_dir = Path(cmd[-1])
    assert cmd[:3] == ["deepspeed", "--num_gpus", "1"] and cmd[5:-1] == ["--no_local_rank", "--module", "runner.worker"]
    assert cmd[3] == "--master_port" and cmd[4].isdigit()
    assert run_dir.parent == cwd.resolve() / "outputs" / "sft"

    recipe = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (recipe["model"]["name"], recipe["deployment"]["name"], recipe["dry_run"]) == (preset, "single_gpu", True)
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 8 and ds["zero_optimization"] == {"stage": 0}
    ds_parse(ds, 1)
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["verdict"] in out.lower() and f"{plan['peak_gb']:,.1f} GiB" in out
    num_params = OmegaConf.load(CONF / "model" / f"{preset}.yaml").num_params
    if num_params:
        assert plan["model_states"]["num_params"] == num_params
        assert f"| the trained model | yes | {num_params:,} |" in (run_dir / "plan.md").read_text()


@pytest.mark.parametrize("preset", PRESETS)
def test_dry_run_writes_only_its_plan(cli_dry_runs, preset):
    proc, cwd = cli_dry_runs[preset].result(timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*") if p.is_file())
    run_dir = Path(files[0]).parent
    assert run_dir.parent == Path("outputs/sft")
    assert [Path(f).name for f in files] == sorted(
        ["config.yaml", "overrides.yaml", "ds_config.json", "launch.sh", "plan.json", "plan.md", "status.json"]
    )
    assert json.loads((cwd / run_dir / "status.json").read_text())["status"] == "planned"


def test_frozen_zero3_engines_fetch_parameters_as_the_zero_group_says(compose):
    """A ZeRO-3 reference (and reward model, judge) keeps the `zero` group's parameter-fetch settings: a user's
    persistence threshold reaches it, and by default it is DeepSpeed's 1e5 (not DeepSpeed-Chat's 1e4, under which
    the tiny model's frozen engines gathered every weight for every forward pass)."""
    from tests.helpers import CPU

    base = ["step=grpo", "reward=tiny", "deployment=cpu", "deployment.nproc_per_node=2", "zero=stage3"]
    for extra, expected in (([], 100000), (["zero.stage3_param_persistence_threshold=5000"], 5000)):
        plan = make_plan(compose([*base, *extra]), CPU)
        ref = plan.method.engine_configs(plan.cfg, plan.world_size, 1, "/nonexistent")["reference"]
        assert ref["zero_optimization"]["stage3_param_persistence_threshold"] == expected
        assert ref["zero_optimization"]["stage3_prefetch_bucket_size"] == plan.cfg.zero.stage3_prefetch_bucket_size
