"""Every key a user gives is one something reads. Hydra refuses an unknown key and suggests `+` to add it; a key
added with `+` is accepted by Hydra whatever it is, so the runner checks those itself: `+` is for the places that
take free-form keys (ds.*: raw DeepSpeed keys, checked by DeepSpeed's parser; zero.*: DeepSpeed's ZeRO keys; a data
set's fields; a pipeline stage's own list; a secret such as logger.api_key), and anything else names the closest
key that exists."""

from __future__ import annotations

import difflib

from omegaconf import DictConfig

from runner import stages
from runner.errors import ConfigError
from runner.overrides import is_secret, key as key_of

FREE_FORM = ("ds.", "zero.", "hydra.", "step.pending_exports")


def flat_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    out = []
    for name in cfg.keys():
        node = cfg._get_node(name)
        full = f"{prefix}{name}"
        out.append(full)
        if isinstance(node, DictConfig):
            out += flat_keys(node, full + ".")
    return out


def closest(key: str, keys: list[str]) -> str | None:
    """The existing key a typo most likely meant: one with the same last part, else the most similar path."""
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return difflib.get_close_matches(key, same_leaf, n=1, cutoff=0.0)[0]
    found = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    return found[0] if found else None


def allowed(key: str, cfg: DictConfig) -> bool:
    if key.startswith(FREE_FORM) or is_secret(key):
        return True
    parts = key.split(".")
    if parts[0] == "data" and len(parts) >= 5 and parts[1] == "sets" and parts[3] == "fields":
        return True  # a data set's field mapping: any role name
    return str(cfg.step.name) == "rlhf" and len(parts) == 2 and parts[0] == "step" and parts[1] in stages.names()


def check_added(cfg: DictConfig, overrides: list[str]) -> None:
    """Keys added with `+` (or `++`) outside the free-form places are refused, naming the closest existing key."""
    added = [key_of(o) for o in overrides if o.startswith("+") and "=" in o]
    bad = [k for k in added if not allowed(k, cfg)]
    if not bad:
        return
    key = bad[0]
    existing = [k for k in flat_keys(cfg) if k not in added and not any(k.startswith(a + ".") for a in added)]
    near = closest(key, existing)
    raise ConfigError(
        key,
        "is not a key of this configuration: nothing would read it (`+` adds keys only under "
        "ds.*, zero.*, a data set's fields and a pipeline stage's list)",
        f"did you mean {near}? ({near}=VALUE, without +)" if near else "check the key's spelling",
    )


def unknown_key_message(key: str, config_dir: str, group_overrides: list[str]) -> str:
    """The runner's message for a key Hydra refused to override: the closest key of the composed config."""
    return unknown_key_error(key, config_dir, group_overrides).render()


def unknown_key_error(key: str, config_dir: str, group_overrides: list[str]) -> ConfigError:
    import hydra

    try:
        with hydra.initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = hydra.compose("config", overrides=group_overrides)
        near = closest(key, flat_keys(cfg))
    except Exception:
        near = None
    fix = f"did you mean {near}?" if near else "check the key's spelling (python -m runner --cfg job lists every key)"
    return ConfigError(key, "is not a key of this configuration", fix)


def is_group_choice(override: str) -> bool:
    """`model=opt-1.3b`: a config group selection (no dot in the key, no +)."""
    k = override.split("=", 1)[0]
    return "." not in k and not k.startswith(("+", "~")) and "=" in override


__all__ = ["check_added", "closest", "flat_keys", "unknown_key_message"]
