"""runner.chat: the conversation logic in-process (prompt building, `clear`, history truncation, answer cutting), the
command line as a subprocess on a tiny OPT export (a greedy chat, a reward model refused, bad directories)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from runner import ASSETS, REPO_ROOT
from runner.chat import (
    NEW_TURN,
    TEMPLATE,
    ChatError,
    Conversation,
    build_prompt,
    chat,
    check_dir,
    check_reward_dir,
    clean_answer,
    parse_args,
    pick_device_dtype,
    piped_reader,
    setup,
    visible,
)

ARCH = dict(
    vocab_size=1024,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    ffn_dim=128,
    max_position_embeddings=256,
    word_embed_proj_dim=64,
)


def save_export(path, model, kind):
    """A directory as the runner's export writes it: config, safetensors weights, tokenizer, runner_export.json."""
    from transformers import AutoTokenizer

    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(ASSETS / "tiny_tokenizer").save_pretrained(path)
    (path / "runner_export.json").write_text(json.dumps({"kind": kind}))
    return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{"lm": causal LM export, "rm": reward-model export}, tiny OPTs with fixed weights."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM, OPTForSequenceClassification

    root = tmp_path_factory.mktemp("chat")
    torch.manual_seed(0)
    lm = save_export(root / "lm", OPTForCausalLM(OPTConfig(**ARCH)), "causal_lm")
    rm = save_export(root / "rm", OPTForSequenceClassification(OPTConfig(num_labels=1, **ARCH)), "reward_model")
    return {"lm": lm, "rm": rm}


def run_chat(*args, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runner.chat", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )


def run_loop(
    lines, encode=lambda s: list(s.encode()), decode=lambda ids: bytes(ids).decode(), max_tokens=None, answers=None
):
    """chat() in-process with a fake model that records the prompt it is shown: (conversation, prompts, stdout)."""
    conv, prompts, out, err = Conversation(TEMPLATE, encode, max_tokens), [], io.StringIO(), io.StringIO()
    answers = iter(answers or [f"answer {i}" for i in range(1, 100)])

    def generate(ids, show):
        prompts.append(decode(ids))
        return next(answers)

    chat(conv, generate, piped_reader(io.StringIO("".join(x + "\n" for x in lines)), out), out=out, err=err)
    return conv, prompts, out.getvalue() + err.getvalue()


# ------------------------------------------------------------------------------------------ the conversation
def test_build_prompt_concatenates_turns_with_earlier_answers():
    turns = [("Hi", "Hello!"), ("And you?", None)]
    assert build_prompt(turns) == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: And you?\n\nAssistant:"
    assert build_prompt(turns, "Q: {prompt}\nA: ") == "Q: Hi\nA: Hello!Q: And you?\nA: "  # no doubled space
    assert build_prompt([]) == ""


def test_clean_answer_cuts_where_the_model_starts_a_new_turn():
    assert clean_answer(" Paris.\n\nHuman: and Spain?\n\nAssistant: Madrid") == "Paris."
    assert clean_answer("  fine  \n") == "fine"


def test_history_is_carried_and_clear_forgets_it():
    conv, prompts, out = run_loop(
        ["Hi", "  And you?  ", "", "clear", "Again", "quit", "never read"],
        answers=["Hello!\n\nHuman: fake turn", "Fine.", "Back."],
    )
    assert prompts == [
        build_prompt([("Hi", None)]),
        build_prompt([("Hi", "Hello!"), ("And you?", None)]),
        build_prompt([("Again", None)]),
    ]  # after `clear` only the new turn
    assert [x for x in out.splitlines() if x.startswith("Assistant:")] == [
        "Assistant: Hello!",
        "Assistant: Fine.",
        "Assistant: Back.",
    ]
    assert conv.turns == [("Again", "Back.")] and "never read" not in out


def test_eof_ends_the_loop():
    conv, prompts, _ = run_loop(["Hi"])
    assert conv.turns == [("Hi", "answer 1")] and len(prompts) == 1


def test_visible_never_shows_a_turn_marker_or_its_start():
    assert visible(" Paris.\n\nHu", (NEW_TURN,), final=False) == "Paris."  # may become "\n\nHuman:": held back
    assert visible(" Paris.\n\nHe", (NEW_TURN,), final=False) == "Paris.\n\nHe"  # cannot: shown
    assert visible(" Paris.\n\nHuman: and", (NEW_TURN,), final=False) == "Paris."  # nothing from the marker on
    assert visible(" Paris.\n", (NEW_TURN,), final=True) == "Paris."


def test_answers_are_shown_while_they_are_generated():
    """The stream reaches the output before generation ends; a turn marker the model writes never does; the printed
    answer is the one kept in the conversation."""
    out, seen_midway = io.StringIO(), []
    pieces = [" Hel", "lo ", "there!", "\n\nHu", "man: fake", " turn"]

    def generate(ids, show):
        for i, piece in enumerate(pieces):
            show(piece)
            if i == 2:
                seen_midway.append(out.getvalue())
        return "".join(pieces)

    conv = Conversation(TEMPLATE, lambda s: list(s.encode()), None)
    chat(conv, generate, piped_reader(io.StringIO("Hi\n"), io.StringIO()), out=out, err=io.StringIO())
    assert seen_midway == ["Assistant: Hello there!"]
    assert out.getvalue() == "Assistant: Hello there!\n" and conv.turns == [("Hi", "Hello there!")]


def test_reward_scores_are_printed_beside_answers(exports):
    """--reward with the tiny reward export: the streamed answers of the real model, each with the score the runner's
    own reward stage gives that prompt and answer (its tokenisation of a pair, its scalar head at the last token)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from runner.data.kinds import pairs
    from runner.train.models import ScalarHeadModel, last_token_scores

    args = [str(exports["lm"]), "--device", "cpu", "--temperature", "0", "--max_new_tokens", "12"]
    conv, generate, stops, banner, score = setup(parse_args(args + ["--reward", str(exports["rm"])]))
    assert f"reward: {exports['rm']} (reward_model, OPTForSequenceClassification)" in banner
    shown = []
    out = io.StringIO()
    streamed = lambda ids, show: generate(ids, lambda piece: (shown.append(piece), show(piece)))
    read = piped_reader(io.StringIO("Hello there\nWhat is two plus two?\n"), io.StringIO())
    chat(conv, streamed, read, out=out, err=io.StringIO(), stops=stops, score=score)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and len(shown) > 2, (lines, shown)

    tok = AutoTokenizer.from_pretrained(exports["rm"])
    rm = ScalarHeadModel(AutoModelForSequenceClassification.from_pretrained(exports["rm"])).eval()
    for i, line in enumerate(lines):
        human, answer = conv.turns[i]
        assert line == f"Assistant: {answer}  [reward {float(line.rsplit('[reward ', 1)[1][:-1]):+.3f}]", line
        prompt = build_prompt(conv.turns[:i] + [(human, None)])
        row = pairs(
            {"prompt": [prompt], "chosen": [" " + answer], "rejected": [""], "extra": ["{}"]}, tok, 10**6, "truncate"
        )
        ids = torch.tensor(row["chosen_ids"])
        with torch.no_grad():
            expected = float(last_token_scores(rm(ids, torch.ones_like(ids)), torch.ones_like(ids))[0])
        assert line.endswith(f"[reward {expected:+.3f}]"), (line, expected)
    assert len({line.rsplit("[", 1)[1] for line in lines}) == 2  # two answers, two scores


def test_reward_directories_that_are_no_reward_model(exports, tmp_path):
    assert "OPTForSequenceClassification" in check_reward_dir(exports["rm"])
    with pytest.raises(ChatError, match="--reward .* not a reward model .*step=reward"):
        check_reward_dir(exports["lm"])
    critic = shutil.copytree(exports["rm"], tmp_path / "critic")
    (critic / "runner_export.json").write_text(json.dumps({"kind": "critic"}))
    with pytest.raises(ChatError, match="critic export .* values, not rewards"):
        check_reward_dir(critic)
    with pytest.raises(ChatError, match="--reward .*: no such directory"):
        check_reward_dir(tmp_path / "nope")


def test_a_causal_lm_as_reward_is_refused_on_the_command_line(exports):
    result = run_chat(exports["lm"], "--reward", exports["lm"], stdin="Hello\n")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: --reward ") and result.stderr.strip().count("\n") == 0, result.stderr


def test_history_drops_oldest_turns_at_turn_boundaries():
    """With the real tokenizer: the oldest whole turns go, the newest stays; a message too long alone is refused."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny_tokenizer")
    encode, decode = (lambda text: tok(text).input_ids), (lambda ids: tok.decode(ids, skip_special_tokens=True))
    questions = ["What is the capital of France?", "And of Spain?", "Which one is bigger?", "Thanks, bye!"]
    answers = [f"answer {i}" for i in range(1, 5)]
    seen = [
        build_prompt([*zip(questions[max(0, i - 1) : i], answers[max(0, i - 1) : i]), (questions[i], None)])
        for i in range(4)
    ]  # each question shown after the previous turn only
    limit = max(len(encode(p)) for p in seen)
    assert len(encode(build_prompt([*zip(questions[:2], answers[:2]), (questions[2], None)]))) > limit
    conv, prompts, out = run_loop(questions, encode, decode, max_tokens=limit)
    assert prompts == seen
    assert conv.turns == [(questions[2], "answer 3"), (questions[3], "answer 4")]
    assert out.count(f"(dropped the 1 oldest turn(s) to stay within {limit} tokens)") == 2

    conv, prompts, out = run_loop(["short", "word " * 60], encode, decode, max_tokens=limit)
    assert conv.turns == [("short", "answer 1")] and len(prompts) == 1 and "not sent" in out


# ------------------------------------------------------------------------------------------ the command line
def test_greedy_chat_two_turns_clear_one_turn(exports):
    stdin = "Hello there\nWhat is two plus two?\nclear\nHi again\nquit\nnot read\n"
    result = run_chat(exports["lm"], "--temperature", "0", "--max_new_tokens", "8", stdin=stdin)
    context = f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 0, context
    assert "Traceback" not in result.stderr, context
    assert len([x for x in result.stdout.splitlines() if x.startswith("Assistant:")]) == 3, context
    assert str(exports["lm"]) in result.stdout and "(conversation cleared)" in result.stdout, context


def test_reward_model_export_is_refused(exports):
    result = run_chat(exports["rm"], stdin="Hello\n")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "reward model" in result.stderr and "cannot chat" in result.stderr and "export" in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr  # one line


def test_missing_directory_is_refused(tmp_path):
    result = run_chat(tmp_path / "nope")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{tmp_path / 'nope'}: no such directory" in result.stderr


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no-config", "no config.json"),
        ("no-tokenizer", "no tokenizer files"),
        ("critic", "critic export"),
        ("classifier", "sequence classifier"),
    ],
)
def test_directories_that_cannot_chat(exports, tmp_path, case, expected):
    path = shutil.copytree(exports["lm"], tmp_path / case)
    if case == "no-config":
        (path / "config.json").unlink()
    elif case == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (path / name).unlink()
    elif case == "critic":
        (path / "runner_export.json").write_text(json.dumps({"kind": "critic"}))
    else:  # a foreign HF directory: no runner_export.json, a classifier architecture
        (path / "runner_export.json").unlink()
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "architectures": ["OPTForSequenceClassification"]}))
    with pytest.raises(ChatError, match=expected):
        check_dir(path)


def test_foreign_causal_lm_without_runner_export_is_accepted(exports, tmp_path):
    path = shutil.copytree(exports["lm"], tmp_path / "foreign")
    (path / "runner_export.json").unlink()
    assert "OPTForCausalLM" in check_dir(path)


def test_max_history_tokens_with_the_real_model(exports):
    """setup() as the command line runs it, in-process: the flag reaches the conversation, which drops old turns."""
    conv, generate, stops, banner, score = setup(
        parse_args(
            [
                str(exports["lm"]),
                "--device",
                "cpu",
                "--temperature",
                "0",
                "--max_new_tokens",
                "8",
                "--max_history_tokens",
                "30",
            ]
        )
    )
    assert conv.max_tokens == 30 and "cpu, fp32; greedy" in banner and score is None
    out, err = io.StringIO(), io.StringIO()
    chat(
        conv,
        generate,
        piped_reader(io.StringIO("Hello there\nWhat is two plus two?\nAnd three?\n"), out),
        out=out,
        err=err,
        stops=stops,
    )
    assert out.getvalue().count("Assistant:") == 3 and "oldest turn(s) to stay within 30 tokens" in err.getvalue()
    assert len(conv.turns) < 3 and conv.turns[-1][0] == "And three?"
    assert len(conv.encode(build_prompt(conv.turns[:-1] + [(conv.turns[-1][0], None)]))) <= 30
    assert setup(parse_args([str(exports["lm"]), "--device", "cpu"]))[0].max_tokens == 256 - 128  # the default


def test_device_and_dtype_errors(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device_dtype("auto", "auto") == ("cpu", "fp32")
    with pytest.raises(ChatError, match="--device cuda"):
        pick_device_dtype("cuda", "auto")
    with pytest.raises(ChatError, match="fp16 is not supported on CPU"):
        pick_device_dtype("cpu", "fp16")
