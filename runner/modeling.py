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


def _build(auto_class, model: DictConfig, config, ds_config: dict, dtype: str, gradient_checkpointing: bool):
    """from_config (model.path null) or from_pretrained, partitioned at construction under ZeRO-3 so that no rank
    ever holds the whole model: transformers enters deepspeed.zero.Init itself while an HfDeepSpeedConfig is alive,
    for every module of the model, so heads are partitioned with the backbone in the same dtype."""
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = ds_config["zero_optimization"]["stage"] == 3
    if zero3:
        # zero.Init patches torch.Tensor.__new__; torch._dynamo, imported lazily by transformers while the model is
        # built, checks that signature at import and fails. Import it before entering the context.
        import torch._dynamo  # noqa: F401
    keep = HfDeepSpeedConfig(ds_config) if zero3 else None
    if model.path is None:
        net = auto_class.from_config(config, dtype=DTYPES[dtype])
    else:
        net = auto_class.from_pretrained(os.path.expanduser(str(model.path)), config=config, dtype=DTYPES[dtype])
    del keep
    if gradient_checkpointing:
        net.gradient_checkpointing_enable()
        net.config.use_cache = False
    return net


def load_causal_lm(model: DictConfig, ds_config: dict, dtype: str, gradient_checkpointing: bool = False):
    from transformers import AutoModelForCausalLM

    return _build(AutoModelForCausalLM, model, model_config(model), ds_config, dtype, gradient_checkpointing)


class ScalarHeadModel(torch.nn.Module):
    """A transformer backbone with a scalar head, stored as transformers' `*ForSequenceClassification` with
    num_labels=1 (so an export loads with AutoModelForSequenceClassification). forward() gives the value of every
    token; a sequence's score is the value at its last real (non-padding) token, found from the attention mask,
    which stays right when the pad token equals eos. The reward model and the PPO critic are both this."""

    def __init__(self, hf):
        super().__init__()
        if not hasattr(hf, "score"):
            raise ConfigError("model", f"{type(hf).__name__} has no `score` head", "use a decoder-only model")
        self.hf = hf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.hf.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.hf.score(hidden).squeeze(-1).float()


def last_token_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    last = attention_mask.sum(-1) - 1
    return values.gather(1, last.unsqueeze(1)).squeeze(1)


def load_scalar_model(model: DictConfig, ds_config: dict, dtype: str, pad_token_id: int,
                      gradient_checkpointing: bool = False) -> ScalarHeadModel:
    """A reward model / critic: from a reward export (backbone and head), or from a causal LM (a base model or an
    SFT export: the backbone's weights, a new head)."""
    from transformers import AutoModelForSequenceClassification

    config = model_config(model)
    config.num_labels = 1
    config.pad_token_id = pad_token_id
    return ScalarHeadModel(_build(AutoModelForSequenceClassification, model, config, ds_config, dtype,
                                  gradient_checkpointing))
