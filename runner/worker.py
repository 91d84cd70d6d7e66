"""`python -m runner.worker RUN_DIR`: what every rank runs. It reads the run directory the driver wrote (never the
command line Hydra parsed), joins the process group and runs the recipe of the method named in the config."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m runner.worker RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[0]).resolve()
    cfg, dist = join(run_dir)
    from runner import stages

    module, _, function = stages.get(cfg.step.name).recipe.partition(":")
    getattr(importlib.import_module(module), function)(cfg, run_dir, dist)
    leave()


def join(run_dir: Path):
    """This rank joins the run: its config (the run directory's config.yaml), the process group (of the size that
    was planned), its record (runner.train.lifecycle) and the loggers' environment; (cfg, dist)."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    from runner.train.engine import init_distributed

    dist = init_distributed(cfg.deployment.get("threads_per_rank"), cfg.get("parallel"))
    if dist.world != cfg.runtime.world_size:
        print(
            f"error: the run was planned for {cfg.runtime.world_size} ranks but {dist.world} started; "
            f"launch it with {run_dir / 'launch.sh'}",
            file=sys.stderr,
        )
        sys.exit(2)
    from runner.train import lifecycle
    from runner.train.metrics import configure_wandb_env

    lifecycle.start(run_dir, dist)
    configure_wandb_env(cfg, run_dir)  # before any engine exists: DeepSpeed's monitor calls wandb.init
    return cfg, dist


def leave() -> None:
    """The rank's work is done: wait for the others, leave the process group and exit (status 0)."""
    # Only on success: a rank that raised must exit (the launcher then stops the others), not wait in a barrier
    # while the other ranks wait in a collective of the training step.
    import deepspeed.comm as dist_comm
    import torch.distributed

    if torch.distributed.is_initialized():
        dist_comm.barrier()
        torch.distributed.destroy_process_group()
    # Leave without the interpreter's teardown: background threads of the communication backends destroyed at exit
    # sometimes abort the process ("terminate called without an active exception", exit 250) after a good run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
