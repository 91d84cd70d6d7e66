"""Reward model end to end on CPU: accuracy on held-out pairs (prompts about items training never saw) rising well
above chance, ZeRO-3 on two ranks (where DeepSpeed-Chat's reward model fails), the best checkpoint kept, and an
export that reloads with AutoModelForSequenceClassification and scores like the trained model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import checkpoint_state, metrics, run_cli, run_dir_of, summary

pytestmark = pytest.mark.e2e
HELDOUT = Path(__file__).resolve().parent.parent / "runner" / "assets" / "tiny_data" / "heldout.jsonl"
REWARD = ["step=reward", "train.log_every=10", "train.eval_every=50", "train.eval_max_batches=10"]


def pair_scores(model, tok, rows):
    """Scores of (chosen, rejected) as the stage computes them: prompt + answer + eos, value at the last real token."""
    from runner.data.batches import PairCollator
    from runner.train.models import last_token_scores

    def ids(text):
        return tok(text).input_ids + [tok.eos_token_id]

    batch = PairCollator(tok.pad_token_id)(
        [{"chosen_ids": ids(r["prompt"] + r["chosen"]), "rejected_ids": ids(r["prompt"] + r["rejected"])} for r in rows]
    )
    with torch.no_grad():
        hidden = model.base_model(**batch).last_hidden_state
        scores = last_token_scores(model.score(hidden).squeeze(-1), batch["attention_mask"])
    return scores.chunk(2)


def check_export(run_dir, rows):
    """The export loads as a sequence classifier, matches the DeepSpeed checkpoint, and returns its scores."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    exported = AutoModelForSequenceClassification.from_pretrained(run_dir / "export").eval()
    tok = AutoTokenizer.from_pretrained(run_dir / "export")
    assert json.loads((run_dir / "export" / "runner_export.json").read_text())["kind"] == "reward_model"
    state = checkpoint_state(run_dir)
    reference = AutoModelForSequenceClassification.from_config(exported.config).eval()
    reference.load_state_dict({k.removeprefix("hf."): v for k, v in state.items()})
    c1, r1 = pair_scores(exported, tok, rows)
    c2, r2 = pair_scores(reference, tok, rows)
    torch.testing.assert_close(c1, c2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r1, r2, rtol=1e-5, atol=1e-5)
    return c1, r1


def heldout(n=200):
    return [json.loads(x) for x in HELDOUT.read_text().splitlines()][:n]


def test_reward_from_sft_export_learns_heldout_preferences(tmp_path, sft_run):
    run_dir = run_dir_of(run_cli(tmp_path, *REWARD, f"step.init_from={sft_run / 'export'}", "train.max_steps=150"))
    acc = metrics(run_dir, "eval/accuracy")
    assert acc[150] > 0.85 and acc[150] >= acc[50] - 0.05, acc
    s = summary(run_dir)
    assert s["objective_name"] == "accuracy" and s["best"]["accuracy"] == max(acc.values())
    assert (run_dir / "checkpoints" / "best").is_dir() and (run_dir / "checkpoints" / "latest").read_text() == "step150"
    assert s["eval_chosen_score"] > s["eval_rejected_score"] and s["eval_margin"] > 0
    chosen, rejected = check_export(run_dir, heldout())
    heldout_accuracy = float((chosen > rejected).float().mean())
    assert heldout_accuracy >= 0.85, heldout_accuracy  # items never seen in training


def test_reward_zero3_two_ranks(tmp_path):
    run_dir = run_dir_of(
        run_cli(
            tmp_path,
            *REWARD,
            "zero=stage3",
            "deployment=cpu",
            "deployment.nproc_per_node=2",
            "train.micro_batch_size=4",
            "train.max_steps=100",
        )
    )
    s = summary(run_dir)
    assert s["world_size"] == 2 and len(s["zero_partitioned_numel"]) == 2
    assert s["eval_accuracy"] > 0.75, s
    check_export(run_dir, heldout(64))
