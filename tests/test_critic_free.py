"""The critic-free estimators, KL estimators, loss aggregations and clipping (runner.rl) against hand-computed
values: one group of 4 answers with returns 1, 2, 3, 6 (mean 3, unbiased std sqrt(14/3) = 2.1602)."""

import math

import pytest
import torch

from runner.rl import advantages, kl, losses

RETURNS = torch.tensor([1.0, 2.0, 3.0, 6.0])
STD = math.sqrt(14 / 3)


def outcome(scores: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards with each answer's score on its last token, and the answer mask."""
    width = max(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])
    rewards = torch.zeros_like(mask)
    rewards[torch.arange(len(lengths)), torch.tensor(lengths) - 1] = scores
    return rewards, mask


def per_answer(name: str, scores, groups, lengths=None) -> list[float]:
    lengths = lengths or [2, 3, 1, 2][: len(scores)] + [2] * max(0, len(scores) - 4)
    rewards, mask = outcome(torch.as_tensor(scores, dtype=torch.float32), lengths)
    adv, _ = advantages.get(name).fn(rewards, mask, groups=torch.tensor(groups))
    assert torch.all(adv * (1 - mask) == 0)  # nothing outside the answer
    first = adv[:, 0]
    assert torch.allclose(adv, first.unsqueeze(1) * mask)  # the same on every answer token
    return first.tolist()


def test_grpo_divides_by_the_group_std():
    assert per_answer("grpo", RETURNS, [0] * 4) == pytest.approx([-2 / STD, -1 / STD, 0.0, 3 / STD], abs=1e-5)


def test_dr_grpo_subtracts_the_group_mean_only():
    assert per_answer("dr_grpo", RETURNS, [0] * 4) == pytest.approx([-2.0, -1.0, 0.0, 3.0])


def test_rloo_leaves_the_answer_out_of_its_baseline():
    # baselines (12 - R) / 3 = 11/3, 10/3, 3, 2
    assert per_answer("rloo", RETURNS, [0] * 4) == pytest.approx([-8 / 3, -4 / 3, 0.0, 4.0])


def test_groups_are_separate():
    two = per_answer("dr_grpo", [1.0, 3.0, 10.0, 20.0], [0, 0, 1, 1])
    assert two == pytest.approx([-1.0, 1.0, -5.0, 5.0])


@pytest.mark.parametrize("name", ["grpo", "rloo", "dr_grpo"])
def test_a_group_of_one_and_equal_rewards_give_no_nan(name):
    assert per_answer(name, [5.0], [0], [3]) == pytest.approx([5.0], abs=1e-4)  # no baseline: the return itself
    equal = per_answer(name, [2.0] * 4, [7] * 4)
    assert equal == [0.0] * 4 and not any(math.isnan(x) for x in equal)


def test_reinforce_pp_returns_to_go_and_asks_for_batch_whitening():
    rewards = torch.tensor([[0.1, -0.2, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    adv, ret = advantages.get("reinforce_pp").fn(rewards, mask, groups=torch.tensor([0, 1]))
    torch.testing.assert_close(adv, torch.tensor([[0.9, 0.8, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]]))
    assert advantages.get("reinforce_pp").whiten and not advantages.get("grpo").whiten
    assert not any(advantages.get(n).needs_values for n in ("grpo", "dr_grpo", "rloo", "reinforce_pp"))


def test_kl_estimators():
    # pi = 0.5, pi_ref = 0.25: r = log 0.5; k1 = log 2, k2 = (log 2)^2 / 2, k3 = 0.5 - 1 + log 2
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    got = [float(kl.kl_estimate(logp, ref, k)) for k in ("k1", "k2", "k3")]
    assert got == pytest.approx([math.log(2), math.log(2) ** 2 / 2, math.log(2) - 0.5])
    assert float(kl.kl_estimate(ref, logp, "k1")) < 0 <= float(kl.kl_estimate(ref, logp, "k3"))


@pytest.mark.parametrize(
    "mode, expected",
    [("token-mean", 2.5), ("seq-mean-token-sum", 5.0), ("seq-mean-token-mean", 3.0), ("seq-mean-token-sum-norm", 1.25)],
)
def test_loss_aggregations(mode, expected):
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert float(losses.aggregate(loss, mask, mode, norm=4.0)) == pytest.approx(expected)


def test_clip_higher_and_dual_clip():
    mask = torch.ones(1, 3)
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 1.5, 4.0]]))
    adv = torch.tensor([[1.0, -1.0, -1.0]])
    # A = +1, ratio 1.5 -> capped at 1 + 0.28: -1.28; A = -1, ratio 1.5: 1.5; A = -1, ratio 4: 4, dual-clipped to 3
    loss, frac = losses.clipped_policy_loss(logp, old, adv, mask, 0.2, 0.28, dual_clip=3.0)
    assert float(loss) == pytest.approx((-1.28 + 1.5 + 3.0) / 3)
    assert float(frac["clip_fraction"]) == pytest.approx(1 / 3) and float(frac["dual_clip_fraction"]) == pytest.approx(
        1 / 3
    )
    plain, _ = losses.clipped_policy_loss(logp, old, adv, mask, 0.2, 0.2)
    assert float(plain) == pytest.approx((-1.2 + 1.5 + 4.0) / 3)


def test_overlong_penalty_and_informative_groups():
    lengths = torch.tensor([10, 15, 17, 20, 25])
    assert kl.overlong_penalty(lengths, 20, 5).tolist() == pytest.approx([0.0, 0.0, -0.4, -1.0, -1.0])
    keep = kl.informative_groups(torch.tensor([1.0, 1.0, 0.0, 2.0]), torch.tensor([0, 0, 1, 1]))
    assert keep.tolist() == [False, False, True, True]
