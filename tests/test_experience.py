"""The tensor plumbing of on-policy methods, on its own: padding (one function, both sides), the answer-token mask
offset, concatenating experience batches of different widths, and training chunks trimmed to their own width."""

from __future__ import annotations

import torch

from runner.data.batches import Cursor, pad, train_batches
from runner.rl.experience import Experience, action_mask


def test_pad_right_and_left():
    ids, mask = pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_action_mask_marks_the_positions_that_score_the_answer_tokens():
    # prompt [p0 p1 p2] + answer [a0 a1]: position t scores token t+1, so a0 (token 3) is scored at position 2
    mask = action_mask(prompt_lens=[3, 1], answer_lens=[2, 3], width=5)
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    ids, _ = pad([[10, 11, 12, 20, 21], [10, 20, 21, 22]], pad_id=0)
    logp = torch.log_softmax(torch.randn(2, 5, 30), -1)
    scored = logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    # the masked positions are exactly the answer tokens' log-probs
    assert torch.equal(scored[0][mask[0].bool()], logp[0, [2, 3], [20, 21]])
    assert torch.equal(scored[1][mask[1].bool()], logp[1, [0, 1, 2], [20, 21, 22]])


def experience(prompts: list[list[int]], answers: list[list[int]], pad_id: int = 0) -> Experience:
    ids, attn = pad([p + a for p, a in zip(prompts, answers)], pad_id)
    actions = action_mask([len(p) for p in prompts], [len(a) for a in answers], ids.size(1))
    b, width = ids.shape
    values = torch.arange(b * (width - 1), dtype=torch.float).view(b, width - 1) * actions
    return Experience(
        input_ids=ids,
        attention_mask=attn,
        action_mask=actions,
        logprobs=-values,
        scores=torch.ones(b),
        entropy=torch.tensor([0.5]),
        ref_logprobs=None,
        values=values,
    )


def test_concat_pads_every_field_to_the_widest_batch():
    narrow = experience([[1, 2]], [[3]])  # width 3
    wide = experience([[1, 2, 3]], [[4, 5, 6]], 9)  # width 6, pad 9 (unused: no padding in this batch)
    both = Experience.concat([narrow, wide], pad_id=7)
    assert both.input_ids.tolist() == [[1, 2, 3, 7, 7, 7], [1, 2, 3, 4, 5, 6]]
    assert both.attention_mask.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert both.action_mask.tolist() == [[0, 1, 0, 0, 0], [0, 0, 1, 1, 1]]
    assert both.values.shape == (2, 5) and both.values[0, 2:].abs().sum() == 0
    assert both.ref_logprobs is None and both.scores.tolist() == [1.0, 1.0] and both.entropy.shape == (2,)


def test_chunk_trims_to_its_own_longest_row():
    exp = Experience.concat([experience([[1, 2]], [[3]]), experience([[1, 2, 3]], [[4, 5, 6]])], pad_id=0)
    chunk = exp.chunk(torch.tensor([0]))
    assert chunk.input_ids.tolist() == [[1, 2, 3]] and chunk.action_mask.tolist() == [[0, 1]]
    assert chunk.values.shape == (1, 2) and chunk.scores.tolist() == [1.0]
    full = exp.chunk(torch.tensor([1, 0]))
    assert full.input_ids.shape == (2, 6) and full.input_ids[0].tolist() == [1, 2, 3, 4, 5, 6]


def test_cursor_continues_where_it_stopped():
    run = Cursor(n=10, size=2, world=1, rank=0, seed=3, group=2)  # 5 batches a epoch, groups of 2: 4 used
    seen = [run.next() for _ in range(6)]
    assert seen[:4] == train_batches(10, 2, 1, 0, 3, 0)[:4] and seen[4:] == train_batches(10, 2, 1, 0, 3, 1)[:2]
    again = Cursor(n=10, size=2, world=1, rank=0, seed=3, group=2)
    again.load_state_dict(run.state_dict())
    assert again.next() == run.next()
