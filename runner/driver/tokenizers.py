"""Models of one method that read each other's tokens must share a tokenizer (PPO's actor, critic and reward model)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from runner.errors import ConfigError
from runner.paths import is_local_path


def same_tokenizers(cfg: DictConfig, keys: tuple[str, ...]) -> None:
    """Models of one method that read each other's tokens (actor, critic, reward model) must share a tokenizer."""
    from runner import modeling

    step = cfg.step
    present = [
        k
        for k in keys
        if step.get(k) and is_local_path(str(step[k])) and (Path(str(step[k])) / "tokenizer_config.json").is_file()
    ]
    if len({modeling.tokenizer_key(str(step[k]), load=None) for k in present}) <= 1:
        return  # byte-identical tokenizer files (every export of one pipeline): the same tokenizer, nothing to load
    prints = {}
    for key in present:
        tok = modeling.load_tokenizer(OmegaConf.create({"tokenizer": str(step[key])}), key=f"step.{key}")
        prints[key] = modeling.tokenizer_fingerprint(tok)
    for key in present[1:]:
        if prints[key] != prints[present[0]]:
            raise ConfigError(
                f"step.{key}",
                f"its tokenizer ({step[key]}) differs from the one of "
                f"step.{present[0]} ({step[present[0]]}): one model would read other tokens than the "
                "other writes",
                "train every model with the same tokenizer (the same model.tokenizer in every stage)",
            )
