"""Command-line override bookkeeping shared by the driver, the pipeline and the run-directory record: keys,
merging (later wins), and secrets (never written down)."""

from __future__ import annotations

import logging
import re

from omegaconf import DictConfig

SECRET_KEY = re.compile(r"(api_?key|token|secret|password)$", re.IGNORECASE)
REDACTED = "<redacted>"


def key(override: str) -> str:
    """`+a.b=1` -> `a.b`."""
    return override.split("=", 1)[0].lstrip("+~")


def merge(*lists: list[str]) -> list[str]:
    """Concatenate override lists; a later override of the same key replaces an earlier one (in its place)."""
    merged: dict[str, str] = {}
    for overrides in lists:
        for o in overrides:
            merged.pop(key(o), None)
            merged[key(o)] = o
    return list(merged.values())


def is_secret(name: str) -> bool:
    return bool(SECRET_KEY.search(name.rsplit(".", 1)[-1]))


def redact(overrides: list[str]) -> list[str]:
    """Overrides as they may be written down: the value of any secret-looking key (api_key, token, secret,
    password) replaced by <redacted>."""
    return [f"{o.split('=', 1)[0]}={REDACTED}" if "=" in o and is_secret(key(o)) else o for o in overrides]


def secret_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every key of a config whose name looks like a secret."""
    found = []
    for name in cfg.keys() if isinstance(cfg, DictConfig) else []:
        full = f"{prefix}{name}"
        value = cfg._get_node(name)
        if isinstance(value, DictConfig):
            found += secret_keys(value, full + ".")
        elif SECRET_KEY.search(str(name)):
            found.append(full)
    return found


SECRET_TOKEN = re.compile(r"(\S*?(?:api_?key|token|secret|password)\s*[=:]\s*)('[^']*'|\"[^\"]*\"|\S+)", re.IGNORECASE)


class RedactFilter(logging.Filter):
    """A logging filter (Hydra's console: conf/hydra/hydra_logging/redacted.yaml) that replaces the value of every
    secret-looking `key=value` in a message by <redacted>."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = SECRET_TOKEN.sub(lambda m: m.group(1) + REDACTED, message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True
