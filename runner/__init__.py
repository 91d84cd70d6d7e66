"""runner: a declarative, config-driven experiment runner for RLHF fine-tuning on DeepSpeed.

`python -m runner` composes the Hydra config in conf/, plans the run (runner.driver), writes the run directory and
starts the real launcher on `runner.worker`, which runs the method's recipe (runner.stages.<name>).
"""

from pathlib import Path

from omegaconf import OmegaConf

ASSETS = Path(__file__).resolve().parent / "assets"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _asset(name: str) -> str:
    return str(ASSETS / name)


def _first(*values):
    """The first value that is not null: ${first:${.path},${asset:tiny_tokenizer}}."""
    return next((v for v in values if v is not None), None)


if not OmegaConf.has_resolver("asset"):
    OmegaConf.register_new_resolver("asset", _asset)
if not OmegaConf.has_resolver("first"):
    OmegaConf.register_new_resolver("first", _first)
