"""Tokenizers and models: from the hub, from a local directory, or built from an architecture (the tiny model)."""
from __future__ import annotations

import os

import torch
from omegaconf import DictConfig, OmegaConf

from runner.errors import ConfigError

DROPOUT_KEYS = ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop",
                "attn_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_tokenizer(model: DictConfig):
    from transformers import AutoTokenizer

    name = str(model.tokenizer)
    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(name))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError("model.tokenizer", f"cannot load tokenizer {name!r}: {first}",
                          "give a hub id that is reachable (or cached) or a local tokenizer directory") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def model_config(model: DictConfig, tokenizer=None):
    """The transformers config: the checkpoint's own, or one built from model.arch; dropout overridden if asked."""
    from transformers import AutoConfig

    if model.path is None:
        arch = OmegaConf.to_container(model.arch, resolve=True)
        config = AutoConfig.for_model(**arch)
    else:
        try:
            config = AutoConfig.from_pretrained(os.path.expanduser(str(model.path)))
        except Exception:
            if not model.get("arch"):
                raise ConfigError("model.path", f"cannot read the config of {model.path!r}",
                                  "check the path or hub id") from None
            config = AutoConfig.for_model(**OmegaConf.to_container(model.arch, resolve=True))
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise ConfigError("model.tokenizer", f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
                          f"has {config.vocab_size}", "use the tokenizer that belongs to the model")
    if model.get("dropout") is not None:
        for key in DROPOUT_KEYS:
            if hasattr(config, key):
                setattr(config, key, float(model.dropout))
    return config


def _meta_model(model: DictConfig, tokenizer):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config(model, tokenizer))


def count_params(model: DictConfig, tokenizer=None) -> int:
    if model.get("num_params"):
        return int(model.num_params)
    return sum(p.numel() for p in _meta_model(model, tokenizer).parameters())


def largest_layer(model: DictConfig, tokenizer=None) -> int:
    meta = _meta_model(model, tokenizer)
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in meta.modules())


def load_causal_lm(model: DictConfig, ds_config: dict, dtype: str, gradient_checkpointing: bool = False):
    """A causal LM, partitioned at construction under ZeRO-3 so that no rank ever holds the whole model."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    config = model_config(model)
    zero3 = ds_config["zero_optimization"]["stage"] == 3
    torch_dtype = DTYPES[dtype]
    if zero3:
        # zero.Init patches torch.Tensor.__new__; torch._dynamo, imported lazily by transformers while the model is
        # built, checks that signature at import and fails. Import it before entering the context.
        import torch._dynamo  # noqa: F401
    # Under ZeRO-3 transformers partitions the model while it is built (deepspeed.zero.Init), for from_config and
    # from_pretrained alike, as long as an HfDeepSpeedConfig is alive.
    keep = HfDeepSpeedConfig(ds_config) if zero3 else None  # noqa: F841
    if model.path is None:
        net = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    else:
        net = AutoModelForCausalLM.from_pretrained(os.path.expanduser(str(model.path)), config=config,
                                                   dtype=torch_dtype)
    if gradient_checkpointing:
        net.gradient_checkpointing_enable()
        net.config.use_cache = False
    return net
