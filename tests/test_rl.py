"""PPO's arithmetic (runner.rl) against values worked out by hand, and the pipeline's override merging."""

from __future__ import annotations

import math

import pytest
import torch

from runner import rl


def test_logprobs_score_the_next_token():
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]]))
    ids = torch.tensor([[0, 1, 2]])
    lp = rl.logprobs_of(logits, ids)
    assert torch.allclose(lp, torch.log(torch.tensor([[0.2, 0.8]])))
    ent = rl.entropy_of(logits)
    assert ent[0, 0] == pytest.approx(-(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)), rel=1e-5)
    both = rl.logprobs_and_entropy(logits, ids)  # one log-softmax for the two: the same numbers
    assert torch.equal(both[0], lp) and torch.equal(both[1], ent)


def test_token_rewards_put_the_clipped_score_on_the_last_answer_token():
    logp = torch.tensor([[0.0, -1.0, -1.0, -1.0, 0.0]])
    ref = torch.tensor([[0.0, -2.0, -1.0, -0.5, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    r = rl.token_rewards(logp, ref, torch.tensor([9.0]), mask, kl_coef=0.1, clip_reward_value=5.0)
    assert torch.allclose(r, torch.tensor([[0.0, -0.1, 0.0, 0.05 + 5.0, 0.0]]))


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.0]])
    values = torch.tensor([[9.0, 0.5, 0.2, 0.1, 9.0]])  # outside the mask: ignored
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    gamma, lam = 0.9, 0.8
    # backwards over t = 3, 2, 1; the value after the last answer token is 0
    d3 = 2.0 + 0 - 0.1
    d2 = 0.0 + gamma * 0.1 - 0.2
    d1 = 1.0 + gamma * 0.2 - 0.5
    a3 = d3
    a2 = d2 + gamma * lam * a3
    a1 = d1 + gamma * lam * a2
    adv, ret = rl.gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, torch.tensor([[0.0, a1, a2, a3, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.0, a1 + 0.5, a2 + 0.2, a3 + 0.1, 0.0]]), atol=1e-6)


def test_gae_rows_are_independent():
    rewards = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    values = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    adv, _ = rl.gae(rewards, values, mask, 1.0, 1.0)
    assert torch.allclose(adv, torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0]]))


def test_policy_loss_clips_the_ratio():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, clipped = rl.policy_loss(new, old, adv, mask, cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert clipped.item() == 1.0
    loss, clipped = rl.policy_loss(old, old, adv, mask, cliprange=0.2)
    assert loss.item() == pytest.approx(0.0) and clipped.item() == 0.0


def test_value_loss_takes_the_larger_of_clipped_and_unclipped():
    old = torch.tensor([[0.0]])
    returns = torch.tensor([[1.0]])
    loss, frac = rl.value_loss(torch.tensor([[0.9]]), old, returns, torch.ones(1, 1), cliprange_value=0.2, coef=0.5)
    assert loss.item() == pytest.approx(0.5 * 0.8**2) and frac.item() == 1.0  # clipped to 0.2: error 0.8
    loss, frac = rl.value_loss(torch.tensor([[0.1]]), old, returns, torch.ones(1, 1), cliprange_value=0.2, coef=0.5)
    assert loss.item() == pytest.approx(0.5 * 0.9**2) and frac.item() == 0.0


def test_kl_controllers():
    fixed = rl.KLController("fixed", 0.1, 6.0, 10000)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.1
    adaptive = rl.KLController("adaptive", 0.1, 6.0, 10000)
    adaptive.update(12.0, 1000)  # KL twice the target: error clipped to +0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 1000 / 10000))
    adaptive.update(3.0, 1000)  # half the target: error clipped to -0.2
    assert adaptive.value < 0.1 * (1 + 0.2 * 0.1)
    with pytest.raises(ValueError):
        rl.KLController("sometimes", 0.1, 6.0, 1)


def test_running_moments_merge_batches():
    xs = torch.randn(1000, dtype=torch.float64) * 3 + 2
    m = rl.RunningMoments()
    for chunk in xs.split(37):
        m.update(len(chunk), float(chunk.sum()), float((chunk**2).sum()))
    assert m.mean == pytest.approx(float(xs.mean()), rel=1e-9)
    assert m.std == pytest.approx(float(xs.std(unbiased=False)), rel=1e-6)


def test_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = rl.whiten(x, mask)
    assert rl.masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6) and w[0, 3] == 0


def test_pipeline_overrides_later_wins_in_place():
    from runner.overrides import merge

    assert merge(["model=tiny", "zero=stage0", "+x=1"], ["zero=stage3", "x=2"]) == ["model=tiny", "zero=stage3", "x=2"]
