"""Chat in the terminal with a causal LM the runner exported (the `export` directory of an SFT or PPO run).

    python -m runner.chat outputs/sft/<run>/export [--temperature 0.7] [--top_p 0.9] [--max_new_tokens 128]
                                                   [--device auto|cpu|cuda] [--dtype auto|fp32|fp16|bf16]
                                                   [--reward outputs/reward/<run>/export]

Answers appear word by word as they are generated. With --reward, a reward model (a step=reward run's export) scores
each answer, and the score is printed beside it: `Assistant: ...  [reward +0.412]`.

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
import sys
from pathlib import Path

from runner.chat_models import (  # noqa: F401  (check_dir, pick_device_dtype: the command line's checks)
    ChatError,
    check_dir,
    check_reward_dir,
    load,
    make_generate,
    make_score,
    pick_device_dtype,
)

TEMPLATE = "\n\nHuman: {prompt}\n\nAssistant:"
NEW_TURN = "\n\nHuman:"  # where an answer ends if the model goes on to write the next question itself


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


def visible(text: str, stops: tuple[str, ...], final: bool) -> str:
    """What of a partial answer can be shown: the text before the first turn marker the model wrote, without a tail
    that may still grow into one (until the answer is complete); stripped as clean_answer strips it."""
    hits = [text.find(stop) for stop in stops if stop in text]
    if hits:
        text, final = text[: min(hits)], True
    elif not final:  # hold back e.g. "\n\nHu", the start of "\n\nHuman:"
        hold = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        text = text[: len(text) - hold]
    return text.strip() if final else text.lstrip()


class AnswerPrinter:
    """Prints an answer while it is generated (`show(text)` per decoded piece): never a turn marker the model starts
    to write, and at the end whatever the stream did not show."""

    def __init__(self, stops: tuple[str, ...], out):
        self.stops, self.out, self.text, self.shown = stops, out, "", 0

    def show(self, piece: str) -> None:
        self.text += piece
        self._print(visible(self.text, self.stops, final=False))

    def finish(self, text: str) -> None:
        self.text = text  # the whole continuation, decoded at once
        self._print(visible(text, self.stops, final=True))

    def _print(self, part: str) -> None:
        if len(part) > self.shown:
            print(part[self.shown :], end="", file=self.out, flush=True)
            self.shown = len(part)


def chat(conv: Conversation, generate, read, out=sys.stdout, err=sys.stderr, stops=(NEW_TURN,), score=None) -> None:
    """The loop: read a line (read(prompt) raises EOFError at the end), run a command or answer it. `generate(ids,
    show)` returns the continuation and passes its text to `show` as it is generated; `score(prompt text, answer
    text)`, when given, is the reward model's score, printed beside the answer."""
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
        print("Assistant: ", end="", file=out, flush=True)
        printer = AnswerPrinter(stops, out)
        raw = generate(ids, printer.show)
        printer.finish(raw)
        answer = clean_answer(raw, stops)
        conv.answer(answer)
        if score is not None:
            prompt = build_prompt(conv.turns[:-1] + [(text, None)], conv.template)
            reward = score(prompt, build_prompt(conv.turns, conv.template)[len(prompt) :])
            print(f"  [reward {reward:+.3f}]", end="", file=out)
        print(file=out, flush=True)


def piped_reader(stream=sys.stdin, out=sys.stdout):
    """read(prompt) for a stdin that is not a terminal: one line per call, echoed so the transcript reads well."""

    def read(prompt: str) -> str:
        line = stream.readline()
        if not line:
            raise EOFError
        print(prompt + line.rstrip("\n"), file=out, flush=True)
        return line

    return read


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
    p.add_argument("--reward", metavar="EXPORT", help="a reward model (a step=reward run's export): score each answer")
    p.add_argument(
        "--max_history_tokens",
        type=int,
        default=None,
        help="default: the model's max_position_embeddings minus --max_new_tokens",
    )
    return p.parse_args(argv)


def setup(args: argparse.Namespace):
    """Check everything, load the models; (conversation, generate, stops, banner, score or None) or ChatError."""
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
    reward_path = Path(args.reward).expanduser() if args.reward else None
    judged = check_reward_dir(reward_path) if reward_path else None
    device, dtype = pick_device_dtype(args.device, args.dtype)
    tok, model = load(path, device, dtype)
    score = make_score(*reversed(load(reward_path, device, dtype, reward=True))) if reward_path else None
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
        f"history up to {limit} tokens"
        + (f"\nreward: {reward_path} ({judged}) scores each answer" if judged else "")
        + "\ncommands: clear (forget the conversation), quit / exit / Ctrl-D"
    )
    return conv, make_generate(model, tok, args, stops), stops, banner, score


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        conv, generate, stops, banner, score = setup(args)
        print(banner, flush=True)
        if sys.stdin.isatty():
            with contextlib.suppress(ImportError):
                importlib.import_module("readline")  # line editing and history for input()
            read = input
        else:
            read = piped_reader()
        chat(conv, generate, read, stops=stops, score=score)
    except ChatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
