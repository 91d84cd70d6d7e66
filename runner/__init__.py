"""runner: a declarative, config-driven experiment runner for RLHF fine-tuning on DeepSpeed.

`python -m runner` composes the Hydra config in conf/, plans the run (runner.plan), writes the run directory and starts
the real launcher on `runner.worker`, which dispatches to a stage in runner.stages.
"""

from pathlib import Path

from omegaconf import OmegaConf

ASSETS = Path(__file__).resolve().parent / "assets"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _asset(name: str) -> str:
    return str(ASSETS / name)


if not OmegaConf.has_resolver("asset"):
    OmegaConf.register_new_resolver("asset", _asset)
