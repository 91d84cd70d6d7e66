"""Tokenizers and model configurations, shared by the driver and the ranks (no torch at import: the driver
plans without it). Building models is the ranks' part: runner.train.models."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from runner.errors import ConfigError
from runner.paths import is_local_path

DROPOUT_KEYS = (
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "hidden_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
)


def load_tokenizer(model: DictConfig, key: str = "model.tokenizer"):
    from transformers import AutoTokenizer

    name = str(model.tokenizer)
    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(name))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        offline = is_local_path(name) is False and ("offline" in first.lower() or os.environ.get("HF_HUB_OFFLINE"))
        fix = (
            "it is not in the local Hugging Face cache and the hub is not reachable: download it once with "
            "network, or point model.path (and model.tokenizer) at a local copy"
            if offline
            else "give a hub id that is reachable (or cached), or a local directory with tokenizer files "
            "(model.path=DIR brings its own)"
        )
        raise ConfigError(key, f"cannot load tokenizer {name!r}: {first}", fix) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)


def tokenizer_key(name: str, load) -> str:
    """What a tokenizer is, for cache keys: its files' content for a local directory (nothing is loaded), else the
    loaded tokenizer's fingerprint (`load()` returns it)."""
    import hashlib

    path = Path(os.path.expanduser(name))
    files = [path / f for f in TOKENIZER_FILES if (path / f).is_file()] if path.is_dir() else []
    if not files:
        return tokenizer_fingerprint(load())
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + f.read_bytes())
    return "files:" + digest.hexdigest()[:16]


def tokenizer_fingerprint(tok) -> str:
    """Identifies a tokenizer by its vocabulary, merges, normalisation and special tokens."""
    import hashlib

    special = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, getattr(tok, "chat_template", None)]
    return hashlib.sha256((tok.backend_tokenizer.to_str() + repr(special)).encode()).hexdigest()[:16]


def model_config(model: DictConfig, tokenizer=None):
    """The transformers config: the checkpoint's own, or one built from model.arch; dropout overridden if asked."""
    from transformers import AutoConfig

    if model.path is None:
        arch = OmegaConf.to_container(model.arch, resolve=True)
        config = AutoConfig.for_model(**arch)
    else:
        try:
            config = AutoConfig.from_pretrained(os.path.expanduser(str(model.path)))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                "model.path",
                f"cannot read the config of {model.path!r}: {first}",
                "check the path or hub id (offline, the model must be in the Hugging Face cache, or "
                "model.path must be a local directory)",
            ) from None
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise ConfigError(
            "model.tokenizer",
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {config.vocab_size}",
            "use the tokenizer that belongs to the model",
        )
    if model.get("dropout") is not None:
        for key in DROPOUT_KEYS:
            if hasattr(config, key):
                setattr(config, key, float(model.dropout))
    return config


def arch_config(model: DictConfig):
    """The transformers config of model.arch: what planning counts (for a preset, its checkpoint's architecture;
    for model.path=DIR, the directory's config.json, read by the planner)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(**OmegaConf.to_container(model.arch, resolve=True))


def _meta_model(model: DictConfig, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    config = arch_config(model)
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise ConfigError(
            "model.tokenizer",
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {config.vocab_size}",
            "use the tokenizer that belongs to the model",
        )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def planned_params(model: DictConfig) -> int:
    """The model's parameter count, the cheapest way known: its preset's figure, a local checkpoint's safetensors
    headers, else its architecture built on the meta device (seconds: it imports transformers' model code)."""
    counted = None if model.get("num_params") else weights_numel(model.get("path"))
    return counted[0] if counted else count_params(model)


def count_params(model: DictConfig, tokenizer=None) -> int:
    if model.get("num_params"):
        return int(model.num_params)
    return sum(p.numel() for p in _meta_model(model, tokenizer).parameters())


def largest_layer(model: DictConfig, tokenizer=None) -> int:
    meta = _meta_model(model, tokenizer)
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in meta.modules())


def weights_numel(path: str | None) -> tuple[int, int] | None:
    """(parameters, largest tensor's) of the weights a local model directory holds, read from its safetensors
    headers (no weights loaded); None when it has none (a hub name, .bin files)."""
    import json
    import math
    import struct
    from pathlib import Path

    files = sorted(Path(str(path)).glob("*.safetensors")) if path and Path(str(path)).is_dir() else []
    if not files:
        return None
    sizes = []
    for f in files:
        try:
            with open(f, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
            sizes += [math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__"]
        except (OSError, struct.error, ValueError, KeyError, TypeError) as exc:
            from runner.errors import ConfigError

            raise ConfigError(
                str(f),
                f"is not a readable safetensors file ({type(exc).__name__}: truncated or corrupt?)",
                "download or export the model again",
            ) from None
    return (sum(sizes), max(sizes)) if sizes else None
