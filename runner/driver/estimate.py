"""What one pass of a model costs beyond its weights: activation memory and FLOPs, from the architecture alone.

A method describes its step as passes (runner.stages.base.Method.workload): a training pass (forward + backward of
`batch` sequences of `seq` tokens), a forward without gradients (scoring, reference log-probs) or a generation
(`new` tokens after `seq` prompt tokens, with its KV cache). Pure functions of numbers: the planner adds them to the
model states (runner.driver.memory) and checks the sum against the hardware (runner.driver.fit).

Activation accounting (bytes, `w` = 2 for 16-bit and 4 for fp32 activations; b sequences of s tokens; hidden h,
ffn f, L layers, a heads, kv of them for keys and values, vocabulary V), after Korthikanti et al. 2022 with the
attention of PyTorch's SDPA kernels (no s x s scores kept; `eager` attention keeps a*s*s softmax scores per layer):
- per layer, kept for the backward pass: layer norm in/out x2, q, k, v, attention output, the output projection's
  input: (6 + 2 kv/a) b s h w; the MLP: 2 b s f w (fc1 output, activation), 4 b s f w when gated (gate, up, act,
  product: Llama, Qwen); dropout masks b s (h + f) bytes when dropout is on.
- gradient checkpointing keeps each layer's input (b s h w per layer) and one layer's full set while recomputing.
- the head: without gradients, logits b s V w, their fp32 copy (16-bit) and the log-softmax (4 bytes each); in the
  backward pass of the loss, the log-softmax output, its gradient and the fp32 logits' (12 bytes; + w for the
  16-bit logits' gradient); the training step's own logits are freed after the loss is taken. The largest term for
  big vocabularies and long sequences.
"""

from __future__ import annotations

import dataclasses

GATED = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3", "mixtral", "qwen2_moe")


@dataclasses.dataclass(frozen=True)
class Arch:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    gated: bool
    dropout: bool

    @staticmethod
    def of(arch: dict, dropout: float | None = None) -> Arch:
        """From a Hugging Face config (a preset's `arch`, or a checkpoint's config.json)."""
        get = arch.get
        hidden = int(get("hidden_size") or get("n_embd") or get("d_model") or 0)
        heads = int(get("num_attention_heads") or get("n_head") or 1)
        ffn = get("ffn_dim") or get("intermediate_size") or get("n_inner") or 4 * hidden
        rate = dropout if dropout is not None else (get("dropout") or get("attention_dropout") or 0.0)
        return Arch(
            hidden=hidden,
            layers=int(get("num_hidden_layers") or get("n_layer") or 0),
            heads=heads,
            kv_heads=int(get("num_key_value_heads") or heads),
            ffn=int(ffn),
            vocab=int(get("vocab_size") or 0),
            gated=str(get("model_type", "")) in GATED,
            dropout=bool(rate),
        )


@dataclasses.dataclass(frozen=True)
class Pass:
    """One kind of work in a step: `kind` is train | forward | generate; `head` lm (a vocabulary head) or value (a
    scalar per token: critics, reward models); `times`: how often it runs per training step on each rank."""

    engine: str  # "" = the trained model, else the engine's name (critic, reference, reward, ...)
    kind: str
    batch: int
    seq: int
    new: int = 0  # generated tokens (generate only)
    head: str = "lm"
    times: float = 1.0
    what: str = ""


def layer_bytes(arch: Arch, b: int, s: int, w: int) -> int:
    """Activations one transformer layer keeps for its backward pass."""
    bsh = b * s * arch.hidden
    kept = (6 + 2 * arch.kv_heads / arch.heads) * bsh * w + (4 if arch.gated else 2) * b * s * arch.ffn * w
    if arch.dropout:
        kept += b * s * (arch.hidden + arch.ffn)
    return int(kept)


def head_bytes(arch: Arch, b: int, s: int, w: int, head: str, backward: bool) -> int:
    """The logits and the loss's buffers (fp32 copy, log-softmax, their gradients); a value head's are negligible."""
    if head != "lm":
        return 0
    bsv = b * s * arch.vocab
    if backward:  # the log-softmax output, its gradient and the logits' (fp32; and the 16-bit logits' gradient)
        return bsv * (12 + (w if w == 2 else 0))
    return bsv * (w + (0 if w == 4 else 4) + 4)  # the logits, their fp32 copy (16-bit), the log-softmax


def pass_bytes(arch: Arch, p: Pass, w: int, checkpointing: bool) -> dict[str, int]:
    """Activation memory of one pass, by term."""
    b, s = p.batch, p.seq
    if p.kind == "generate":
        kv = 2 * arch.layers * b * (s + p.new) * arch.hidden * arch.kv_heads // arch.heads * w
        return {"KV cache": int(kv), "logits": b * arch.vocab * (w + 4) * 2}
    if p.kind == "forward":  # one layer's working set at a time, and the head's output
        return {"activations": layer_bytes(arch, b, s, w), "logits": head_bytes(arch, b, s, w, p.head, False)}
    per_layer = layer_bytes(arch, b, s, w)
    kept = arch.layers * b * s * arch.hidden * w + per_layer if checkpointing else arch.layers * per_layer
    return {"activations": int(kept), "logits": head_bytes(arch, b, s, w, p.head, True)}


def pass_flops(params: int, p: Pass) -> float:
    """Dense FLOPs of one pass (2 per parameter per token forward, 6 with the backward pass; generation's tokens
    each a forward of the whole model)."""
    if p.kind == "generate":
        return 2.0 * params * p.batch * (p.seq + p.new)
    return (6.0 if p.kind == "train" else 2.0) * params * p.batch * p.seq
