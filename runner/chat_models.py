"""The models behind runner.chat: what an export directory holds (no torch needed), device and dtype, loading the
chat model and a reward model, generation shown as it happens, and the reward model's score of an answer."""

from __future__ import annotations

import json
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
CHAT_INSTEAD = "pass a causal LM directory, e.g. the `export` directory of an SFT or PPO run"
REWARD_INSTEAD = "pass --reward a reward model directory, e.g. the `export` directory of a step=reward run"


class ChatError(Exception):
    """Bad input the user can fix: printed as one `error:` line, exit code 2."""


def _describe(path: Path) -> tuple[str | None, list[str], dict]:
    """(runner_export.json's kind, config.json's architectures, config.json), or ChatError."""
    if not path.exists():
        raise ChatError(f"{path}: no such directory")
    if not (path / "config.json").is_file():
        raise ChatError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads((path / "config.json").read_text())
        info = json.loads((path / "runner_export.json").read_text()) if (path / "runner_export.json").is_file() else {}
        return info.get("kind"), list(config.get("architectures") or []), config
    except (ValueError, AttributeError) as exc:
        raise ChatError(f"{path}: unreadable config.json or runner_export.json ({exc})") from None


def _has_tokenizer(path: Path) -> None:
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ChatError(
            f"{path}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...); save the "
            "training tokenizer into it (tokenizer.save_pretrained) or pass the run's `export` directory"
        )


def check_dir(path: Path) -> str:
    """What the directory holds, or ChatError if it is no chat model; no torch needed."""
    try:
        kind, archs, _ = _describe(path)
    except ChatError as exc:
        raise ChatError(f"{exc}; {CHAT_INSTEAD}") from None
    if kind in ("reward_model", "critic") or any(a.endswith("ForSequenceClassification") for a in archs):
        what = f"a {str(kind).replace('_', ' ')} export" if kind else f"a sequence classifier ({', '.join(archs)})"
        raise ChatError(f"{path} holds {what}, which scores text and cannot chat; {CHAT_INSTEAD} instead")
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise ChatError(f"{path} holds {', '.join(archs)}, not a causal LM (...ForCausalLM); {CHAT_INSTEAD}")
    _has_tokenizer(path)
    return f"{kind or 'model'}, {', '.join(archs) or 'unknown architecture'}"


def check_reward_dir(path: Path) -> str:
    """What a --reward directory holds, or ChatError unless it is a reward model: a sequence classifier with one
    label (how the runner's reward stage exports one); a critic estimates values, not rewards."""
    try:
        kind, archs, config = _describe(path)
    except ChatError as exc:
        raise ChatError(f"--reward {exc}; {REWARD_INSTEAD}") from None
    if kind == "critic":
        raise ChatError(f"--reward {path} holds a critic export (it estimates values, not rewards); {REWARD_INSTEAD}")
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        what = f"a {str(kind).replace('_', ' ')} export" if kind else ", ".join(archs) or "no architecture"
        raise ChatError(
            f"--reward {path} holds {what}, not a reward model (...ForSequenceClassification); {REWARD_INSTEAD}"
        )
    if int(config.get("num_labels", len(config.get("id2label") or {}) or 2)) != 1:
        raise ChatError(f"--reward {path}: a classifier with several labels, not a scalar reward (num_labels=1)")
    _has_tokenizer(path)
    return f"{kind or 'reward model'}, {', '.join(archs)}"


def pick_device_dtype(device: str, dtype: str) -> tuple[str, str]:
    import torch

    has_cuda = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
    if device == "cuda" and not has_cuda:
        raise ChatError("--device cuda: torch sees no CUDA GPU here; use --device cpu (or auto)")
    bf16_ok = device == "cuda" and torch.cuda.is_bf16_supported()
    if dtype == "auto":
        dtype = ("bf16" if bf16_ok else "fp16") if device == "cuda" else "fp32"
    if dtype == "fp16" and device == "cpu":
        raise ChatError("--dtype fp16 is not supported on CPU; use --dtype fp32 (or bf16), or --device cuda")
    if dtype == "bf16" and device == "cuda" and not bf16_ok:
        raise ChatError("--dtype bf16: this GPU does not support bfloat16; use --dtype fp16 or fp32")
    return device, dtype


def load(path: Path, device: str, dtype: str, reward: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()  # no "Loading weights" bar before the banner

    def first_line(exc: Exception) -> str:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ChatError(f"{path}: cannot load the tokenizer: {first_line(exc)}") from None
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    try:
        auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
        model = auto.from_pretrained(path, dtype=torch_dtype, local_files_only=True).to(device)
    except Exception as exc:
        raise ChatError(f"{path}: cannot load the model: {first_line(exc)}") from None
    return tok, model.eval()


def make_generate(model, tok, args, stops: tuple[str, ...]):
    """generate(prompt ids, show=None) -> the decoded continuation (special tokens skipped); `show(text)` receives
    the text as it is generated (transformers' TextStreamer: whole words, as soon as they are decoded)."""
    import torch
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def __init__(self, show):
            super().__init__(tok, skip_prompt=True, skip_special_tokens=True)
            self.show = show

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                self.show(text)

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        repetition_penalty=args.repetition_penalty,
        eos_token_id=tok.eos_token_id,
        pad_token_id=pad,
        stop_strings=list(stops),
        tokenizer=tok,
    )
    if args.temperature > 0:
        kwargs.update(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    else:  # greedy; the model's own generation_config may ask for sampling
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)

    def generate(ids: list[int], show=None) -> str:
        input_ids = torch.tensor([ids], device=model.device)
        streamer = Streamer(show) if show else None
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **kwargs
            )
        return tok.decode(out[0, len(ids) :], skip_special_tokens=True)

    return generate


def make_score(model, tok):
    """score(prompt text, answer text) -> the reward model's score: its value at the last token of prompt + answer
    + eos, tokenised as the reward stage tokenises a pair (the prompt with special tokens, the answer without), and
    read as the runner reads it (the score head on the backbone's last hidden state, not a pad-token search). A
    conversation longer than the reward model's positions keeps its last tokens."""
    import torch

    positions = getattr(model.config, "max_position_embeddings", None)

    def score(prompt: str, answer: str) -> float:
        ids = tok(prompt).input_ids + tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids = ids[-positions:] if positions else ids
        input_ids = torch.tensor([ids], device=model.device)
        with torch.inference_mode():
            hidden = model.base_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).last_hidden_state
            return float(model.score(hidden)[0, -1, 0])

    return score
