"""The data layer, in process (no launcher): named sets and formats, data_split slices, blending weights, the cache,
bad data and over-long samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runner.data import batches, prepare as data
from runner.data.prepare import load_prepared
from runner.driver.plan import make_plan
from runner.errors import ConfigError
from runner.train import models
from tests.helpers import CPU, TINY_TOKENIZER, write_jsonl

TINY = Path(__file__).resolve().parent.parent / "runner" / "assets" / "tiny_data"
DS_CHAT = {"sft": 2, "reward": 4, "ppo": 4}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))


@pytest.fixture
def prepare(compose, tokenizer, tmp_path):
    def _prepare(*overrides, cache=None):
        plan = make_plan(compose(list(overrides)), CPU)
        return data.prepare(plan.cfg, plan.method, lambda: tokenizer, cache_root=cache or tmp_path / "cache"), plan.cfg

    return _prepare


def tiny_rows(n: int | None = None) -> list[dict]:
    rows = [json.loads(x) for x in (TINY / "train.jsonl").read_text().splitlines()]
    return rows[:n] if n else rows


# ------------------------------------------------------------------------------------------------ slices
@pytest.mark.parametrize("n", [10, 401, 4000])
def test_stage_slices_are_disjoint_cover_everything_and_stable(n):
    split = DS_CHAT
    slices = [data.stage_slice(n, split, k, seed=1234) for k in split]
    joined = np.concatenate(slices)
    assert sorted(joined.tolist()) == list(range(n))  # disjoint and complete
    assert [len(s) for s in slices] == pytest.approx([n * 0.2, n * 0.4, n * 0.4], abs=1)
    again = [data.stage_slice(n, split, k, seed=1234) for k in split]
    assert all((a == b).all() for a, b in zip(slices, again))  # same seed: same slices, any process
    other = data.stage_slice(n, split, "sft", seed=99)
    assert n < 20 or set(other.tolist()) != set(slices[0].tolist())  # the seed matters


def test_each_stage_gets_its_slice(prepare):
    sizes = {}
    for stage in ("sft", "reward"):
        prepared, cfg = prepare(f"step={stage}")
        sizes[stage] = prepared.counts["train"]
        assert prepared.stats["sets"]["tiny"]["train"]["slice_rows"] == len(
            data.stage_slice(4000, DS_CHAT, stage, 1234)
        )
    assert sizes == {"sft": 800, "reward": 1600}
    whole, _ = prepare("step=sft", "data.split=[1,0,0]")
    assert whole.counts["train"] == 4000


def test_eval_split_is_made_when_a_set_has_none(prepare, tmp_path):
    rows = tiny_rows(500)
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    prepared, _ = prepare(
        "data=local", f"data.sets.local.path={path}", "data.sets.local.sft_target=response", "data.split=[1,0,0]"
    )
    assert prepared.counts == {"train": 450, "eval": 50}  # eval_fraction 0.1, seeded
    again, _ = prepare(
        "data=local",
        f"data.sets.local.path={path}",
        "data.sets.local.sft_target=response",
        "data.split=[1,0,0]",
        "seed=7",
    )
    assert again.stats["cache"] != prepared.stats["cache"]


@pytest.mark.parametrize("one_stage", ["data.split=sft", "data.split=sft_only", "data.split={sft:1}"])
def test_a_stage_that_takes_a_share_says_so_and_one_override_gives_it_every_row(prepare, one_stage):
    shared, cfg = prepare("step=sft")
    assert data.share_notes(shared, cfg.data.split, "sft") == [
        "sft trains on its share of data set tiny: 800 of 4000 rows (data.split={sft: 2, reward: 4, ppo: 4}: each "
        "stage gets rows of its own); to train on every row, run it alone with data.split=sft"
    ]
    whole, cfg = prepare("step=sft", one_stage)
    assert whole.counts["train"] == 4000 and data.share_notes(whole, cfg.data.split, "sft") == []
    assert dict(cfg.data.split) == {"sft": 1}


def test_a_stage_without_a_share_is_told_the_short_form(prepare):
    with pytest.raises(ConfigError) as err:
        prepare("step=reward", "data.split=sft")
    assert err.value.where == "data.split" and "data.split=reward" in err.value.fix


# ------------------------------------------------------------------------------------------------ templates, fields
def test_a_newline_typed_in_a_template_is_a_newline(compose, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "q", "response": "a"}] * 20)
    common = ["data=local", f"data.sets.local.path={path}", "data.sets.local.sft_target=response"]
    plan = make_plan(compose([*common, r"data.sets.local.template='Q: {prompt}\nA:'"]), CPU)  # as a shell passes it
    assert plan.cfg.data.sets.local.template == "Q: {prompt}\nA:"
    assert "data.sets.local.template: read each typed \\n as a newline: 'Q: {prompt}\\nA:'" in plan.notes
    plain = make_plan(compose([*common, "data.sets.local.template='Q: {prompt} A:'"]), CPU)
    assert not [n for n in plain.notes if "newline" in n]
    for bad, problem in (("'{prompt} {answer}'", "other than {prompt}: ['answer']"), ("'{prompt'", "not a valid")):
        with pytest.raises(ConfigError) as err:
            make_plan(compose([*common, f"data.sets.local.template={bad}"]), CPU)
        assert err.value.where == "data.sets.local.template" and problem in err.value.problem


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_a_field_no_row_has_is_named_with_the_files_columns(prepare, tmp_path, policy):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(20)])
    args = ["data=local", f"data.sets.local.path={path}", "data.split=sft", f"data.bad_rows={policy}"]
    with pytest.raises(ConfigError) as err:
        prepare(*args, "data.sets.local.sft_target=answer")
    assert err.value.where == "data.sets.local.fields.prompt"
    assert f"no row of {path} has the field 'prompt'; its columns are: question, answer" in err.value.problem
    assert "data.sets.local.fields.prompt=<column>" in err.value.fix
    with pytest.raises(ConfigError) as err:  # the column SFT learns, when it is not a mapped role
        prepare(*args, "data.sets.local.fields.prompt=question", "data.sets.local.sft_target=reply")
    assert err.value.where == "data.sets.local.sft_target" and "question, answer" in err.value.problem
    mapped, _ = prepare(*args, "data.sets.local.fields.prompt=question", "data.sets.local.sft_target=answer")
    assert mapped.counts["train"] + mapped.counts["eval"] == 20


# ------------------------------------------------------------------------------------------------ blending
def test_blend_respects_weights_and_sft_only(prepare, tmp_path):
    extra = write_jsonl(tmp_path / "extra.jsonl", tiny_rows(1000))
    common = ["data=[tiny,local]", f"data.sets.local.path={extra}", "data.sets.local.sft_target=response"]
    half, _ = prepare("step=sft", *common, "data.sets.local.weight=0.5")
    sets = half.stats["sets"]
    assert sets["local"]["train"]["weighted_rows"] == round(0.5 * sets["local"]["train"]["slice_rows"])
    assert half.counts["train"] == sets["tiny"]["train"]["kept"] + sets["local"]["train"]["kept"]
    double, _ = prepare("step=sft", *common, "data.sets.local.weight=2.5")
    d = double.stats["sets"]["local"]["train"]
    assert d["weighted_rows"] == round(2.5 * d["slice_rows"])
    # sft_only: used whole by SFT, never by the reward stage
    sft, _ = prepare("step=sft", *common, "data.sets.local.sft_only=true")
    assert sft.stats["sets"]["local"]["train"]["slice_rows"] == 900  # all its train rows (10% went to eval)
    reward, _ = prepare("step=reward", *common, "data.sets.local.sft_only=true")
    assert "local" not in reward.stats["sets"]


# ------------------------------------------------------------------------------------------------ cache
def test_cache_is_reused_and_invalidated(prepare, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", tiny_rows(300))
    args = ["data=local", f"data.sets.local.path={path}", "data.sets.local.sft_target=response", "data.split=[1,0,0]"]
    first, _ = prepare(*args)
    meta = Path(first.stats["cache"]) / "meta.json"
    stamp = meta.stat().st_mtime_ns
    second, _ = prepare(*args)
    assert second.stats["cache"] == first.stats["cache"] and meta.stat().st_mtime_ns == stamp  # reused
    rows = tiny_rows(300)
    rows[0]["response"] = " the lamp was lovely and lovely ."
    write_jsonl(path, rows)  # same size and name, new content
    third, _ = prepare(*args)
    assert third.stats["cache"] != first.stats["cache"]
    fourth, _ = prepare(*args, "data.max_seq_len=32")
    assert fourth.stats["cache"] not in (first.stats["cache"], third.stats["cache"])


# ------------------------------------------------------------------------------------------------ formats
def test_embedded_conversation_format(prepare, tokenizer, tmp_path):
    rows = [
        {
            "chosen": f"\n\nHuman: hi {i}\n\nAssistant: hello\n\nHuman: describe the lamp\n\nAssistant: it is bright",
            "rejected": f"\n\nHuman: hi {i}\n\nAssistant: hello\n\nHuman: describe the lamp\n\nAssistant: no",
        }
        for i in range(40)
    ]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    prepared, _ = prepare(
        "step=reward",
        "data=hh-rlhf",
        f"data.sets.hh_rlhf.path={path}",
        "data.sets.hh_rlhf.splits.eval=null",
        "data.split=[0,1,0]",
    )
    sample = load_prepared(prepared.paths["train"])[0]
    chosen, rejected = (tokenizer.decode(sample[k], skip_special_tokens=True) for k in ("chosen_ids", "rejected_ids"))
    assert chosen.endswith("Assistant: it is bright") and rejected.endswith("Assistant: no")
    assert chosen[: chosen.rindex("Assistant:")] == rejected[: rejected.rindex("Assistant:")]


@pytest.mark.parametrize(
    "set_name, rows, winner",
    [
        (
            "webgpt-comparisons",
            [
                {
                    "question": {"full_text": "why?"},
                    "answer_0": "because",
                    "answer_1": "dunno",
                    "score_0": 1.0,
                    "score_1": -1.0,
                }
            ],
            "because",
        ),
        (
            "webgpt-comparisons",
            [
                {
                    "question": {"full_text": "why?"},
                    "answer_0": "because",
                    "answer_1": "dunno",
                    "score_0": -0.5,
                    "score_1": 0.5,
                }
            ],
            "dunno",
        ),
        ("shp", [{"history": "why?", "human_ref_A": "because", "human_ref_B": "dunno", "labels": 0}], "dunno"),
    ],
)
def test_scored_formats_choose_the_better_answer(prepare, tokenizer, tmp_path, set_name, rows, winner):
    key = set_name.replace("-", "_")
    tie = dict(rows[0], score_0=0.0, score_1=0.0) if "score_0" in rows[0] else None
    path = write_jsonl(tmp_path / "s.jsonl", rows * 30 + ([tie] * 5 if tie else []))
    prepared, _ = prepare(
        "step=reward",
        f"data={set_name}",
        f"data.sets.{key}.path={path}",
        f"data.sets.{key}.splits.eval=null",
        "data.split=[0,1,0]",
        "data.bad_rows=skip",
    )
    sample = load_prepared(prepared.paths["train"])[0]
    chosen = tokenizer.decode(sample["chosen_ids"], skip_special_tokens=True)
    assert chosen == f"\n\nHuman: why?\n\nAssistant: {winner}"
    if tie:  # ties carry no preference: dropped and counted
        stats = prepared.stats["sets"][key]
        skipped = stats["train"]["bad_rows_skipped"] + stats["eval"]["bad_rows_skipped"]
        assert skipped == 5


# ------------------------------------------------------------------------------------------------ bad data
@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda r: r.pop("chosen"), "field 'chosen' is missing"),
        (lambda r: r.update(chosen=3), "is int, not text"),
        (lambda r: r.update(rejected="   "), "is empty"),
    ],
)
def test_bad_row_is_named_or_skipped_and_counted(prepare, tmp_path, mutate, reason):
    rows = tiny_rows(200)
    mutate(rows[17])
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    args = [
        "step=reward",
        "data=local",
        f"data.sets.local.path={path}",
        "data.split=[0,1,0]",
        "data.sets.local.eval_fraction=0.01",
    ]
    with pytest.raises(ConfigError) as err:
        prepare(*args)
    assert err.value.where == "data.sets.local" and str(path) in err.value.problem and reason in err.value.problem
    assert "train split, line 18:" in err.value.problem  # rows[17] is the file's 18th line, as an editor counts
    assert "data.bad_rows=skip" in err.value.fix
    prepared, _ = prepare(*args, "data.bad_rows=skip")
    stats = prepared.stats["sets"]["local"]
    assert stats["train"]["bad_rows_skipped"] + stats["eval"]["bad_rows_skipped"] == 1
    assert prepared.counts["train"] + prepared.counts["eval"] == 199


def test_empty_and_unreadable_files(prepare, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError) as err:
        prepare("data=local", f"data.sets.local.path={empty}", "data.split=[1,0,0]")
    assert err.value.where.startswith("data.sets.local")
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("{not json\n")
    with pytest.raises(ConfigError) as err:
        prepare("data=local", f"data.sets.local.path={garbage}", "data.split=[1,0,0]")
    assert err.value.where == "data.sets.local.path" and "JSON" in err.value.problem


def test_overlong_samples_are_truncated_or_dropped_and_counted(prepare, tokenizer):
    cut, _ = prepare("data.max_seq_len=18")  # tiny prompt + response: 19-22 tokens
    stats = cut.stats["sets"]["tiny"]["train"]
    assert stats["overlong"] == stats["slice_rows"] and stats["kept"] == stats["slice_rows"]
    assert max(len(x) for x in load_prepared(cut.paths["train"])["input_ids"]) == 18
    dropped, _ = prepare("data.max_seq_len=21", "data.overlong=drop")
    stats = dropped.stats["sets"]["tiny"]["train"]
    assert 0 < stats["overlong"] < stats["slice_rows"] and stats["kept"] == stats["slice_rows"] - stats["overlong"]


def test_collators_pad_per_batch_and_mask_the_prompt():
    batch = batches.CausalLMCollator(pad_id=1)(
        [{"input_ids": [2, 5, 6, 7], "prompt_len": 2}, {"input_ids": [2, 5, 8], "prompt_len": 2}]
    )
    assert batch["input_ids"].tolist() == [[2, 5, 6, 7], [2, 5, 8, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7], [-100, -100, 8, -100]]
    pairs = batches.PairCollator(pad_id=1)([{"chosen_ids": [2, 3], "rejected_ids": [2, 4, 4]}])
    assert pairs["input_ids"].tolist() == [[2, 3, 1], [2, 4, 4]] and pairs["attention_mask"].sum() == 5


def test_reward_scores_read_the_last_real_token():
    import torch

    values = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 0.6, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert models.last_token_scores(values, mask).tolist() == pytest.approx([0.3, 0.6])


@pytest.mark.parametrize("kind", ["csv", "parquet", "save_to_disk", "split_dir"])
def test_local_formats_load_the_same_rows(prepare, tmp_path, kind):
    from datasets import Dataset, DatasetDict

    rows = tiny_rows(300)
    table = Dataset.from_list(rows)
    if kind == "csv":
        path = tmp_path / "d.csv"
        table.to_csv(str(path))
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        table.to_parquet(str(path))
    elif kind == "save_to_disk":
        path = tmp_path / "saved"
        DatasetDict({"train": table}).save_to_disk(str(path))
    else:
        path = tmp_path / "splits"
        path.mkdir()
        write_jsonl(path / "train.jsonl", rows)
    prepared, _ = prepare(
        "data=local", f"data.sets.local.path={path}", "data.sets.local.sft_target=response", "data.split=[1,0,0]"
    )
    reference, _ = prepare(
        "data=local",
        f"data.sets.local.path={write_jsonl(tmp_path / 'ref.jsonl', rows)}",
        "data.sets.local.sft_target=response",
        "data.split=[1,0,0]",
    )
    assert prepared.counts == reference.counts == {"train": 270, "eval": 30}
    ours, theirs = (load_prepared(p.paths["train"])["input_ids"] for p in (prepared, reference))
    assert ours == theirs


def test_slices_do_not_depend_on_world_size(prepare):
    one, _ = prepare("step=reward")
    two, _ = prepare("step=reward", "deployment=cpu", "deployment.nproc_per_node=2")
    assert one.stats["cache"] == two.stats["cache"]  # the same tokenised slice, built once, for any world size


def test_slices_stay_disjoint_when_stages_drop_different_rows(prepare, tmp_path):
    rows = tiny_rows(1000)
    for r in rows[::7]:  # identical pairs: dropped (skipped) by the reward stage only
        r["rejected"] = r["chosen"]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    args = [
        "data=local",
        f"data.sets.local.path={path}",
        "data.sets.local.sft_target=response",
        "data.sets.local.splits.eval=null",
        "data.bad_rows=skip",
    ]
    sft, _ = prepare("step=sft", *args)
    reward, _ = prepare("step=reward", *args)
    n = 900  # train rows after the seeded 10% eval split
    for prepared, stage in ((sft, "sft"), (reward, "reward")):
        stats = prepared.stats["sets"]["local"]["train"]
        assert stats["slice_rows"] == len(data.stage_slice(n, DS_CHAT, stage, 1234))  # cut before any drop
    assert reward.stats["sets"]["local"]["train"]["bad_rows_skipped"] > 0
    assert sft.stats["sets"]["local"]["train"]["bad_rows_skipped"] == 0


# ------------------------------------------------------------------------------------------------ chat templates
CHAT = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_prompts_go_in_the_tokenizers_chat_template(compose, tokenizer, tmp_path):
    """data.sets.<name>.chat_template=auto: a tokenizer with a chat template gets each prompt as the user's turn with
    the assistant's opening after it (the template's text, no second BOS); one without gets the plain prompt; the
    cache tells them apart; `true` without a template is an error that names the key."""
    import copy

    from transformers import AutoTokenizer

    chat_dir = tmp_path / "chat_tok"
    chat_tok = copy.deepcopy(tokenizer)
    chat_tok.chat_template = CHAT
    chat_tok.save_pretrained(chat_dir)
    loaded = AutoTokenizer.from_pretrained(chat_dir)
    assert loaded.chat_template == CHAT
    text = "the mirror is"
    rows = [{"prompt": text, "response": f"fine {i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    common = ["data=local", f"data.sets.local.path={path}", "data.sets.local.sft_target=response", "data.split=[1,0,0]"]

    def first_prompt(tok_dir, tok, *extra):
        plan = make_plan(compose([*common, f"model.tokenizer={tok_dir}", *extra]), CPU)
        prepared = data.prepare(plan.cfg, plan.method, lambda: tok, cache_root=tmp_path / "cache")
        row = load_prepared(prepared.paths["train"])[0]
        return row["input_ids"][: row["prompt_len"]], prepared

    wrapped, in_chat = first_prompt(chat_dir, loaded)
    expected = loaded(f"<|user|>{text}\n<|assistant|>", add_special_tokens=False)["input_ids"]
    assert wrapped == expected
    plain, as_text = first_prompt(TINY_TOKENIZER, tokenizer)
    assert plain == tokenizer(text)["input_ids"] != wrapped
    assert as_text.stats["cache"] != in_chat.stats["cache"]
    off, _ = first_prompt(chat_dir, loaded, "data.sets.local.chat_template=false")
    assert off == plain
    with pytest.raises(ConfigError) as err:
        first_prompt(TINY_TOKENIZER, tokenizer, "data.sets.local.chat_template=true")
    assert err.value.where == "data.sets.local.chat_template" and "no chat template" in str(err.value)
