"""train.adapt's controller against hand-computed values (runner/train/adapt.py), and its checks."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from runner.driver.plan import make_plan
from runner.errors import ConfigError
from runner.train import adapt
from tests.helpers import CPU


@pytest.mark.parametrize(
    "old, new, lower, expected",
    [
        (2.0, 1.9, True, 1.0),  # loss 2.0 -> 1.9: 5% better = one `scale`
        (2.0, 2.05, True, -0.5),  # 2.5% worse
        (2.0, 1.0, True, 1.0),  # 50% better, clipped to 1
        (0.8, 0.84, False, 1.0),  # accuracy 0.80 -> 0.84: 5% better
        (0.8, 0.4, False, -1.0),  # 50% worse, clipped to -1
        (-1.0, -0.98, False, 0.4),  # a negative reward that rises: 2% of |old|
    ],
)
def test_reward_is_the_clipped_relative_improvement(old, new, lower, expected):
    assert adapt.reward(old, new, lower, scale=0.05, clip=1.0) == pytest.approx(expected)


def test_learning_rate_and_accumulation_follow_r_within_bounds():
    assert adapt.lr_scale(1.0, 1.0, alpha=2.0, low=0.1, high=4.0) == 2.0
    assert adapt.lr_scale(1.0, -0.5, alpha=2.0, low=0.1, high=4.0) == pytest.approx(2**-0.5)
    assert adapt.lr_scale(3.0, 1.0, alpha=2.0, low=0.1, high=4.0) == 4.0  # capped
    assert adapt.lr_scale(0.15, -1.0, alpha=2.0, low=0.1, high=4.0) == 0.1  # floored
    assert adapt.accumulation(2, -1.0, beta=2.0, low=1, high=8) == 4  # worse: average over more samples
    assert adapt.accumulation(2, 1.0, beta=2.0, low=1, high=8) == 1  # better: a smaller batch
    assert adapt.accumulation(1, 1.0, beta=2.0, low=1, high=8) == 1  # never below one micro-batch
    assert adapt.accumulation(8, -1.0, beta=2.0, low=1, high=8) == 8
    assert adapt.accumulation(3, 0.3, beta=1.0, low=1, high=8) == 3  # beta 1: the batch stays


def test_controller_decides_after_each_evaluation_from_the_second_on():
    cfg = OmegaConf.create(
        {"scale": 0.05, "clip": 1.0, "alpha": 2.0, "lr_scale_min": 0.1, "lr_scale_max": 4.0}
        | {"batch_beta": 2.0, "gas_min": 1, "gas_max": 8}
    )
    c = adapt.Controller(cfg, "loss", gas=2)
    assert c.decide(2.0) is None  # the first evaluation only sets the baseline
    assert c.decide(1.9) == {"reward": 1.0, "lr_scale": 2.0, "gas": 1}
    d = c.decide(1.995)  # 5% worse than 1.9: r = -1
    assert d["reward"] == pytest.approx(-1.0) and d["lr_scale"] == pytest.approx(1.0) and d["gas"] == 2
    assert c.decide(float("nan")) is None and c.state["decisions"] == 2
    assert adapt.minimise("loss") and adapt.minimise("perplexity") and not adapt.minimise("reward_mean")


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.adapt.alpha=0"], "train.adapt.alpha"),
        (["train.adapt.lr_scale_min=2"], "train.adapt.lr_scale_min"),
        (["train.adapt.gas_min=4", "train.adapt.gas_max=2"], "train.adapt.gas_min"),
        (["train.adapt.batch_beta=2", "train.gradient_accumulation_steps=16"], "train.gradient_accumulation_steps"),
        (["train.eval_every=0"], "train.eval_every"),
        (["step=grpo", "reward=tiny", "train.adapt.batch_beta=2"], "train.adapt.batch_beta"),
    ],
)
def test_adapt_settings_are_checked(compose, overrides, key):
    with pytest.raises(ConfigError) as err:
        make_plan(compose(["train.adapt.enabled=true", *overrides]), CPU)
    assert err.value.where == key
