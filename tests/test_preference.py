"""The preference losses (runner.rl.preference) against values computed by hand, and the sequence log-probs they
read. One pair: the policy's summed log-probs chosen = -1 (2 answer tokens), rejected = -3 (4 tokens); the
reference's -2 and -2. So h = (pi_c - pi_r) - (ref_c - ref_r) = 2."""

import math

import pytest
import torch

from runner.rl import preference

PAIR = dict(
    chosen=torch.tensor([-1.0]),
    rejected=torch.tensor([-3.0]),
    chosen_len=torch.tensor([2.0]),
    rejected_len=torch.tensor([4.0]),
    ref_chosen=torch.tensor([-2.0]),
    ref_rejected=torch.tensor([-2.0]),
)


def loss_of(name: str, **settings) -> tuple[float, float, float]:
    loss, reward_c, reward_r = preference.get(name).fn(**PAIR, **settings)
    return float(loss), float(reward_c), float(reward_r)


def test_sigmoid_is_dpo():
    # -log sigmoid(0.5 * 2) = log(1 + e^-1); implicit rewards beta * (pi - ref) = 0.5 * 1, 0.5 * -1
    assert loss_of("sigmoid", beta=0.5) == pytest.approx((0.3132616875, 0.5, -0.5))


def test_label_smoothing_is_conservative_dpo():
    # 0.9 * -log sigmoid(1) + 0.1 * -log sigmoid(-1) = 0.9 * 0.31326 + 0.1 * 1.31326
    assert loss_of("sigmoid", beta=0.5, label_smoothing=0.1)[0] == pytest.approx(0.4132616875)


def test_ipo_on_length_averaged_logps():
    # h = (-1/2 - -3/4) - (-2/2 - -2/4) = 0.25 + 0.5 = 0.75; target 1 / (2 * 0.5) = 1; (0.75 - 1)^2
    assert loss_of("ipo", beta=0.5)[0] == pytest.approx(0.0625)


def test_hinge():
    assert loss_of("hinge", beta=0.25)[0] == pytest.approx(0.5)  # max(0, 1 - 0.25 * 2)
    assert loss_of("hinge", beta=1.0)[0] == 0.0  # the margin is past 1: no loss


def test_simpo_is_reference_free_and_length_normalised():
    # beta * avg: 2 * -0.5 = -1 and 2 * -0.75 = -1.5; -log sigmoid(0.5 - 0.5) = log 2; no reference is read
    free = {**PAIR, "ref_chosen": None, "ref_rejected": None}
    loss, reward_c, reward_r = preference.get("simpo").fn(**free, beta=2.0, gamma=0.5)
    assert (float(loss), float(reward_c), float(reward_r)) == pytest.approx((math.log(2), -1.0, -1.5))
    assert not preference.get("simpo").needs_reference


def test_orpo_is_nll_plus_odds_ratio():
    # avg log-probs -0.5 and -0.75; log odds a - log(1 - e^a): 0.43275 and -0.11066, their difference 0.54340;
    # NLL of chosen 0.5 + 0.1 * log(1 + e^-0.54340)
    free = {**PAIR, "ref_chosen": None, "ref_rejected": None}
    loss, _, _ = preference.get("orpo").fn(**free, beta=0.1)
    assert float(loss) == pytest.approx(0.5457912733)
    assert not preference.get("orpo").needs_reference


def test_losses_fall_as_the_margin_grows():
    """Every loss prefers a policy that raises chosen over rejected (its gradient points the right way)."""
    for name in preference.LOSSES:
        chosen = torch.tensor([-2.0], requires_grad=True)
        inputs = {**PAIR, "chosen": chosen}
        loss, _, _ = preference.get(name).fn(**inputs, beta=0.5, gamma=0.1)
        loss.sum().backward()
        assert chosen.grad.item() < 0, name


def test_sequence_logps_score_answer_tokens_only():
    # uniform logits over 4 tokens: every scored token has log-prob -log 4; labels -100 on the prompt and padding
    logits = torch.zeros(2, 5, 4)
    labels = torch.tensor([[-100, -100, 1, 2, 3], [0, 2, 1, -100, -100]])
    total, count = preference.sequence_logps(logits, labels)
    assert count.tolist() == [3, 2]  # position t predicts t + 1: the first label is never a target
    assert total.tolist() == pytest.approx([-3 * math.log(4), -2 * math.log(4)])


def test_unknown_loss_is_named():
    with pytest.raises(KeyError, match="known: hinge, ipo, orpo, sigmoid, simpo"):
        preference.get("kto")
