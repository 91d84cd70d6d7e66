"""Models on the ranks: a causal LM or a scalar-head model (reward model, critic) from the hub, a local directory or
an architecture, partitioned at construction under ZeRO-3; LoRA adapters in and merged out."""

from __future__ import annotations

import contextlib
import os

import torch
from omegaconf import DictConfig

from runner.errors import ConfigError
from runner.modeling import model_config

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _build(auto_class, model: DictConfig, config, ds_config: dict, dtype: str, gradient_checkpointing: bool):
    """from_config (model.path null) or from_pretrained, partitioned at construction under ZeRO-3 so that no rank
    ever holds the whole model: transformers enters deepspeed.zero.Init itself while an HfDeepSpeedConfig is alive,
    for every module of the model, so heads are partitioned with the backbone in the same dtype."""
    from transformers.integrations import HfDeepSpeedConfig

    # Under AutoTP the model is built whole and sharded by deepspeed.initialize: zero.Init at construction would parse
    # the JSON without AutoTP's groups, counting every rank as a data-parallel one (runner.train.parallel).
    zero3 = ds_config["zero_optimization"]["stage"] == 3 and "tensor_parallel" not in ds_config
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


def apply_lora(net: torch.nn.Module, lora: DictConfig, r: int | None = None) -> torch.nn.Module:
    """LoRA adapters (peft, injected in place so the model keeps its class) on the linear layers of the transformer
    blocks; with lora.only_optimize, everything else is frozen except a scalar head (`score`)."""
    r = int(lora.r if r is None else r)
    if not r:
        return net
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora.target_modules
    if targets == "auto":
        targets = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, m in net.named_modules()
                if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in ("lm_head", "score")
            }
        )
    else:
        targets = list(targets)
    dtype = next(net.parameters()).dtype
    net = inject_adapter_in_model(
        LoraConfig(
            r=r, lora_alpha=float(lora.alpha), lora_dropout=float(lora.dropout), target_modules=targets, bias="none"
        ),
        net,
    )
    for name, p in net.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(dtype)  # one dtype for the whole model (ZeRO flattens parameters together)
            p.requires_grad = True
        else:
            p.requires_grad = not lora.only_optimize or name.split(".")[0] == "score"
    if getattr(net, "is_gradient_checkpointing", False):
        net.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return net


def merge_lora(state: dict, lora: DictConfig, r: int) -> dict:
    """A state dict with LoRA adapters folded into their base weights (W + alpha/r * B A), under the base names."""
    if not any(".lora_A." in k for k in state):
        return state
    scaling = float(lora.alpha) / int(r)
    merged = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            prefix, name = key.split(".base_layer.")
            if name == "weight":
                a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
                value = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
            key = f"{prefix}.{name}"
        merged[key] = value
    return merged


def load_causal_lm(
    model: DictConfig,
    ds_config: dict,
    dtype: str,
    gradient_checkpointing: bool = False,
    lora: DictConfig | None = None,
    lora_r: int = 0,
):
    from transformers import AutoModelForCausalLM

    net = _build(AutoModelForCausalLM, model, model_config(model), ds_config, dtype, gradient_checkpointing)
    return apply_lora(net, lora, lora_r) if lora is not None and lora_r else net


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


def load_scalar_model(
    model: DictConfig,
    ds_config: dict,
    dtype: str,
    pad_token_id: int,
    gradient_checkpointing: bool = False,
    lora: DictConfig | None = None,
    lora_r: int = 0,
) -> ScalarHeadModel:
    """A reward model / critic: from a reward export (backbone and head), or from a causal LM (a base model or an
    SFT export: the backbone's weights, a new head)."""
    from transformers import AutoModelForSequenceClassification

    config = model_config(model)
    config.num_labels = 1
    config.pad_token_id = pad_token_id
    net = _build(AutoModelForSequenceClassification, model, config, ds_config, dtype, gradient_checkpointing)
    return ScalarHeadModel(apply_lora(net, lora, lora_r) if lora is not None and lora_r else net)


@contextlib.contextmanager
def adapters_off(module: torch.nn.Module):
    """The model without its LoRA adapters (peft's layers bypassed) for the duration: the base model, for a
    reference that needs no second copy."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield module
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class AdaptersOff:
    """A LoRA policy's engine called as its base model (adapters switched off for the call): the reference of a
    method that would otherwise need a second copy of the model."""

    def __init__(self, engine):
        self.engine = engine

    def __call__(self, **inputs):
        with adapters_off(self.engine.module):
            return self.engine(**inputs)


def positions(module: torch.nn.Module) -> int | None:
    """The model's maximum sequence length (max_position_embeddings), None if it does not say."""
    config = getattr(getattr(module, "hf", module), "config", None)
    return getattr(config, "max_position_embeddings", None)
