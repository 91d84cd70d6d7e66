"""Model and data locations, shared by the driver and the ranks: hub id or local path, and what kind of model a
directory holds."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_local_path(path: str) -> bool:
    """A path on disk, as opposed to a hub id such as `facebook/opt-1.3b`."""
    return (
        os.path.exists(os.path.expanduser(path)) or path.startswith(("/", "./", "../", "~")) or not HUB_ID.match(path)
    )


def local(path: str) -> Path:
    return Path(os.path.expanduser(str(path)))


def export_kind(path: Path) -> str | None:
    """What a model directory holds: runner_export.json's `kind` (causal_lm, reward_model, critic), else read from
    config.json's architectures (causal_lm / reward_model), else None."""
    info = path / "runner_export.json"
    if info.is_file():
        return json.loads(info.read_text()).get("kind")
    config = json.loads((path / "config.json").read_text())
    archs = config.get("architectures") or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return "causal_lm"
    if any(a.endswith("ForSequenceClassification") for a in archs) and config.get("num_labels", 1) == 1:
        return "reward_model"
    return None
