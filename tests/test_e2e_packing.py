"""Packed SFT end to end through the real launcher: a packed tiny run learns, and one stopped in the middle and
resumed ends with the same losses as the uninterrupted run (the packed rows and the data position carry over)."""

from __future__ import annotations

import pytest

from tests.helpers import metrics, run_cli, run_dir_of, summary

pytestmark = pytest.mark.e2e
PACKED = [
    "data.packing=true",
    "data.max_seq_len=64",
    "train.micro_batch_size=2",
    "train.max_steps=20",
    "train.log_every=5",
    "train.eval_every=10",
    "train.eval_max_batches=4",
]


def test_a_packed_sft_run_learns_and_resumes_exactly(tmp_path):
    whole = run_dir_of(run_cli(tmp_path, *PACKED, f"run_dir={tmp_path / 'whole'}"))
    losses = metrics(whole, "train/loss")
    assert losses[20] < 0.8 * losses[5]
    stats = summary(whole)["data"]["packing"]
    assert stats["rows"] < stats["samples"] / 2  # several samples per row
    assert max(metrics(whole, "train/padding_share").values()) < 0.2

    parted = tmp_path / "parted"
    run_cli(tmp_path, *PACKED, "train.stop_at_step=10", f"run_dir={parted}")
    run_cli(tmp_path, f"resume={parted}", "train.stop_at_step=null")
    resumed = metrics(parted, "train/loss")
    for step in (15, 20):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-5), step
    assert metrics(parted, "eval/loss")[20] == pytest.approx(metrics(whole, "eval/loss")[20], rel=1e-5)
