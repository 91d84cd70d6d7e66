"""SLURM through Hydra's submitit launcher, planned without a cluster: node-list expansion, the rendezvous on the
allocation's first node, the sbatch settings and the per-node torchrun command."""

from __future__ import annotations

import pytest

from runner.driver import launch
from runner.driver.plan import Hardware, make_plan
from runner.errors import ConfigError

GPU = Hardware(cuda_devices=8, bf16=True, cpus=16)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu01", ["gpu01"]),
        ("gpu[01-03]", ["gpu01", "gpu02", "gpu03"]),
        ("gpu[08-10,12],login1", ["gpu08", "gpu09", "gpu10", "gpu12", "login1"]),
        ("a[1-2]-ib,b7", ["a1-ib", "a2-ib", "b7"]),
    ],
)
def test_slurm_hostnames(nodelist, hosts):
    assert launch.slurm_hostnames(nodelist) == hosts


def test_slurm_plan_inside_an_allocation(compose, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[03-04]")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    plan = make_plan(compose(["deployment=slurm"]), GPU)
    assert plan.world_size == 16
    cmd = launch.launcher_command(plan.deployment, "/shared/run")
    assert (
        cmd
        == (
            "torchrun --nnodes 2 --rdzv_backend c10d --rdzv_endpoint gpu03:29400 --rdzv_id 4242 "
            "--nproc_per_node 8 -m runner.worker /shared/run"
        ).split()
    )
    import torch.distributed.run as torchrun

    args = torchrun.get_args_parser().parse_args(cmd[1:])
    assert (args.nnodes, args.rdzv_endpoint, args.nproc_per_node) == ("2", "gpu03:29400", "8")


def test_slurm_outside_an_allocation(compose, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    with pytest.raises(ConfigError) as err:
        make_plan(compose(["deployment=slurm"]), GPU)
    assert err.value.where == "deployment" and "SLURM allocation" in err.value.problem
    plan = make_plan(compose(["deployment=slurm", "dry_run=true", "deployment.nnodes=4"]), GPU)
    assert plan.world_size == 32 and plan.deployment.rdzv_endpoint == "FIRST_NODE:29400"


def test_slurm_submitit_settings(compose):
    cfg = compose(
        [
            "deployment=slurm",
            "deployment.nnodes=4",
            "deployment.nproc_per_node=4",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.timeout_min=60",
        ],
        return_hydra_config=True,
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (4, 1, 4)
    assert (launcher.partition, launcher.timeout_min, launcher.max_num_timeout) == ("gpu", 60, 3)
    assert cfg.hydra.mode.name == "MULTIRUN"


def test_optuna_search_config(compose):
    cfg = compose(["hparams_search=reward_optuna"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("optuna_sweeper.OptunaSweeper") and cfg.hydra.mode.name == "MULTIRUN"
    assert sweeper.direction == "maximize" and cfg.step.name == "reward"  # reward runs return eval accuracy
    assert set(sweeper.params) == {"optimizer.lr", "train.micro_batch_size", "step.margin"}
