"""train.adapt end to end: an SFT run whose held-out loss worsens (a learning rate far too large) has its learning
rate lowered and its batch raised by the controller, logged at every evaluation; stopped and resumed, it makes the
same decisions as an uninterrupted run."""

from __future__ import annotations

import pytest

from tests.helpers import metrics, run_cli, run_dir_of

pytestmark = pytest.mark.e2e
ADAPT = [
    "train.adapt.enabled=true",
    "train.adapt.batch_beta=2",
    "train.adapt.gas_max=4",
    "optimizer.lr=0.5",  # the tiny model diverges: every evaluation is worse than the one before
    "scheduler=constant",
    "scheduler.warmup_steps=0",
    "train.max_steps=12",
    "train.eval_every=3",
    "train.eval_max_batches=2",
    "train.log_every=1",
    "train.save_every=3",
]


def test_a_worsening_run_lowers_its_learning_rate_and_resumes_the_same_decisions(tmp_path):
    (tmp_path / "whole").mkdir()
    whole = run_dir_of(run_cli(tmp_path / "whole", *ADAPT))
    loss = metrics(whole, "eval/loss")
    scale, batch, r = metrics(whole, "adapt/lr_scale"), metrics(whole, "adapt/batch"), metrics(whole, "adapt/reward")
    assert sorted(scale) == [3, 6, 9, 12]
    worse = [s for s in (6, 9, 12) if loss[s] > loss[s - 3]]
    assert worse, loss  # (the premise: the held-out loss got worse at least once)
    for s in worse:
        assert r[s] < 0 and scale[s] < scale[s - 3] and batch[s] >= batch[s - 3]
    assert min(scale.values()) < 1 and max(batch.values()) > 8  # (micro-batch 8 x 1 rank: accumulation rose)
    lr = metrics(whole, "train/lr")  # the optimizer really ran at schedule x scale
    assert lr[12] == pytest.approx(0.5 * scale[9], rel=1e-6)
    (tmp_path / "parts").mkdir()
    parts = run_dir_of(run_cli(tmp_path / "parts", *ADAPT, "train.stop_at_step=6"))
    run_cli(tmp_path / "parts", f"resume={parts}", "train.stop_at_step=null")
    for key in ("adapt/lr_scale", "adapt/batch", "adapt/reward", "eval/loss", "train/loss"):
        a, b = metrics(whole, key), metrics(parts, key)
        assert [b[s] for s in sorted(b) if s > 6] == pytest.approx([a[s] for s in sorted(a) if s > 6], abs=1e-5), key
