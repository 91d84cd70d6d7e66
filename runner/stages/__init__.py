"""Training methods, one package each: `runner/stages/<name>/` holds the driver side (its `METHOD`, a
`runner.stages.base.Method`: keys it checks, data it reads, engines and their DeepSpeed JSONs, exports) and the rank
side (its recipe module). `step=<name>` selects one; adding a folder (and conf/step/<name>.yaml) adds a method.

Importing a method's package must stay cheap (no torch): the driver imports it on every launch.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from runner.errors import ConfigError

_HERE = Path(__file__).resolve().parent


def names() -> list[str]:
    """Every method package under runner/stages/ (and the `rlhf` pipeline, which is not a method)."""
    return sorted(m.name for m in pkgutil.iter_modules([str(_HERE)]) if m.ispkg and not m.name.startswith("_"))


def get(name: str):
    """The `METHOD` of runner/stages/<name>/."""
    if name not in names():
        raise ConfigError("step", f"unknown method {name!r}", f"use one of {', '.join(names() + ['rlhf'])}")
    method = importlib.import_module(f"runner.stages.{name}").METHOD
    assert method.name == name, f"runner/stages/{name}/ declares METHOD.name={method.name!r}"
    return method
