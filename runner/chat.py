"""Chat in the terminal with a causal LM the runner exported (the `export` directory of an SFT or PPO run).

    python -m runner.chat outputs/sft/<run>/export [--temperature 0.7] [--top_p 0.9] [--max_new_tokens 128]
                                                   [--device auto|cpu|cuda] [--dtype auto|fp32|fp16|bf16]

Every turn is shown to the model through --template (by default "\\n\\nHuman: {prompt}\\n\\nAssistant:", the
Dahoas/rm-static format the runner trains on); all turns are concatenated, earlier answers included, and the oldest
turns are dropped once the conversation outgrows --max_history_tokens. Type `clear` to forget the conversation,
`quit`, `exit`, Ctrl-D or Ctrl-C to leave. A PPO run's `export_ema` chats too; reward and critic exports cannot.
Lines can be piped in too (each is echoed after `Human: `):

    printf 'Hello!\\nquit\\n' | python -m runner.chat EXPORT_DIR --temperature 0
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
from pathlib import Path

TEMPLATE = "\n\nHuman: {prompt}\n\nAssistant:"
NEW_TURN = "\n\nHuman:"  # where an answer ends if the model goes on to write the next question itself
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
CHAT_INSTEAD = "pass a causal LM directory, e.g. the `export` directory of an SFT or PPO run"


class ChatError(Exception):
    """Bad input the user can fix: printed as one `error:` line, exit code 2."""


class TooLong(ValueError):
    """One message that does not fit --max_history_tokens even alone."""


# ------------------------------------------------------------------- the conversation (no torch: testable alone)
def build_prompt(turns: list[tuple[str, str | None]], template: str = TEMPLATE) -> str:
    """[(human, answer or None), ...] oldest first -> the text the model continues."""
    sep = "" if template[-1:].isspace() else " "  # the answer's leading space, as in the training data
    return "".join(template.format(prompt=human) + (sep + answer if answer else "") for human, answer in turns)


def clean_answer(text: str, stops: tuple[str, ...] = (NEW_TURN,)) -> str:
    """The answer up to the first turn marker the model wrote itself, stripped."""
    for stop in stops:
        text = text.split(stop, 1)[0]
    return text.strip()


class Conversation:
    """The turns so far; `ask` adds one and returns the prompt's token ids, dropping the oldest turns to fit."""

    def __init__(self, template: str, encode, max_tokens: int | None):
        self.template, self.encode, self.max_tokens = template, encode, max_tokens
        self.turns: list[tuple[str, str | None]] = []

    def clear(self) -> None:
        self.turns = []

    def ask(self, human: str) -> tuple[list[int], int]:
        """Add a human turn; return (prompt ids, how many old turns were dropped). TooLong leaves the history as is."""
        alone = len(self.encode(build_prompt([(human, None)], self.template)))
        if self.max_tokens is not None and alone > self.max_tokens:
            raise TooLong(f"this message takes {alone} tokens, over --max_history_tokens {self.max_tokens}; not sent")
        self.turns.append((human, None))
        dropped = 0
        while True:
            ids = self.encode(build_prompt(self.turns, self.template))
            if self.max_tokens is None or len(ids) <= self.max_tokens or len(self.turns) == 1:
                return ids, dropped
            self.turns.pop(0)
            dropped += 1

    def answer(self, text: str) -> None:
        self.turns[-1] = (self.turns[-1][0], text)


def chat(conv: Conversation, generate, read, out=sys.stdout, err=sys.stderr, stops=(NEW_TURN,)) -> None:
    """The loop: read a line (read(prompt) raises EOFError at the end), run a command or answer it."""
    while True:
        try:
            text = read("Human: ").strip()
        except EOFError:
            return
        if text.lower() in ("quit", "exit"):
            return
        if text.lower() == "clear":
            conv.clear()
            print("(conversation cleared)", file=out, flush=True)
            continue
        if not text:
            continue
        try:
            ids, dropped = conv.ask(text)
        except TooLong as exc:
            print(f"error: {exc}", file=err, flush=True)
            continue
        if dropped:
            print(f"(dropped the {dropped} oldest turn(s) to stay within {conv.max_tokens} tokens)", file=err)
        answer = clean_answer(generate(ids), stops)
        conv.answer(answer)
        print(f"Assistant: {answer}", file=out, flush=True)


def piped_reader(stream=sys.stdin, out=sys.stdout):
    """read(prompt) for a stdin that is not a terminal: one line per call, echoed so the transcript reads well."""

    def read(prompt: str) -> str:
        line = stream.readline()
        if not line:
            raise EOFError
        print(prompt + line.rstrip("\n"), file=out, flush=True)
        return line

    return read


# ------------------------------------------------------------------- the model
def check_dir(path: Path) -> str:
    """What the directory holds, or ChatError if it is no chat model; no torch needed."""
    if not path.exists():
        raise ChatError(f"{path}: no such directory; {CHAT_INSTEAD}")
    if not (path / "config.json").is_file():
        raise ChatError(f"{path}: not a Hugging Face model directory (no config.json); {CHAT_INSTEAD}")
    try:
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
        info = json.loads((path / "runner_export.json").read_text()) if (path / "runner_export.json").is_file() else {}
        kind = info.get("kind")
    except (ValueError, AttributeError) as exc:
        raise ChatError(f"{path}: unreadable config.json or runner_export.json ({exc})") from None
    if kind in ("reward_model", "critic") or any(a.endswith("ForSequenceClassification") for a in archs):
        what = f"a {str(kind).replace('_', ' ')} export" if kind else f"a sequence classifier ({', '.join(archs)})"
        raise ChatError(f"{path} holds {what}, which scores text and cannot chat; {CHAT_INSTEAD} instead")
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise ChatError(f"{path} holds {', '.join(archs)}, not a causal LM (...ForCausalLM); {CHAT_INSTEAD}")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ChatError(
            f"{path}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...); save the "
            "training tokenizer into it (tokenizer.save_pretrained) or pass the run's `export` directory"
        )
    return f"{kind or 'model'}, {', '.join(archs) or 'unknown architecture'}"


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


def load(path: Path, device: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
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
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True).to(device)
    except Exception as exc:
        raise ChatError(f"{path}: cannot load the model: {first_line(exc)}") from None
    return tok, model.eval()


def make_generate(model, tok, args, stops: tuple[str, ...]):
    """generate(prompt ids) -> the decoded continuation (special tokens skipped)."""
    import torch

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

    def generate(ids: list[int]) -> str:
        input_ids = torch.tensor([ids], device=model.device)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        return tok.decode(out[0, len(ids) :], skip_special_tokens=True)

    return generate


# ------------------------------------------------------------------- command line
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runner.chat", description=__doc__.split("\n\n")[0])
    p.add_argument("export_dir", help="a Hugging Face causal LM directory, e.g. the `export` of an SFT or PPO run")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--template", default=TEMPLATE, help="one turn; must contain {prompt}")
    p.add_argument(
        "--max_history_tokens",
        type=int,
        default=None,
        help="default: the model's max_position_embeddings minus --max_new_tokens",
    )
    return p.parse_args(argv)


def setup(args: argparse.Namespace):
    """Check everything, load the model; (conversation, generate, stops, banner) or ChatError."""
    path = Path(args.export_dir).expanduser()
    try:
        ok = "{prompt}" in args.template and args.template.format(prompt="") is not None
    except (KeyError, IndexError, ValueError):
        ok = False
    if not ok:
        raise ChatError(
            f"--template {args.template!r} must contain {{prompt}} and no other braces (write them {{{{ }}}})"
        )
    for name, bad in (
        ("max_new_tokens", args.max_new_tokens < 1),
        ("temperature", args.temperature < 0),
        ("top_k", args.top_k < 0),
        ("top_p", not 0 < args.top_p <= 1),
        ("repetition_penalty", args.repetition_penalty <= 0),
    ):
        if bad:
            raise ChatError(f"--{name} {getattr(args, name)} is out of range")
    what = check_dir(path)
    device, dtype = pick_device_dtype(args.device, args.dtype)
    tok, model = load(path, device, dtype)
    positions = getattr(model.config, "max_position_embeddings", None)  # None: no limit known
    room = positions - args.max_new_tokens if positions else None
    limit = args.max_history_tokens if args.max_history_tokens is not None else room
    if room is not None and room < 1:
        raise ChatError(
            f"--max_new_tokens {args.max_new_tokens} leaves no room for the conversation in the model's "
            f"{positions} positions (max_position_embeddings)"
        )
    if limit is not None and not 1 <= limit <= (room or limit):
        why = f" (at most {room}: max_position_embeddings {positions} minus --max_new_tokens)" if room else ""
        raise ChatError(f"--max_history_tokens {limit} is out of range{why}")
    from transformers import set_seed

    set_seed(args.seed)
    head = args.template.split("{prompt}")[0].rstrip()  # e.g. "\n\nUser:" for another template
    stops = tuple(dict.fromkeys([NEW_TURN] + ([head] if head.strip() and head.startswith("\n") else [])))
    conv = Conversation(args.template, lambda text: tok(text).input_ids, limit)
    mode = "greedy" if args.temperature == 0 else f"T={args.temperature} top_k={args.top_k} top_p={args.top_p}"
    banner = (
        f"runner.chat: {path} ({what}) on {device}, {dtype}; {mode}, up to {args.max_new_tokens} new tokens, "
        f"history up to {limit} tokens\ncommands: clear (forget the conversation), quit / exit / Ctrl-D"
    )
    return conv, make_generate(model, tok, args, stops), stops, banner


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        conv, generate, stops, banner = setup(args)
        print(banner, flush=True)
        if sys.stdin.isatty():
            with contextlib.suppress(ImportError):
                importlib.import_module("readline")  # line editing and history for input()
            read = input
        else:
            read = piped_reader()
        chat(conv, generate, read, stops=stops)
    except ChatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
