"""Critic-free advantages across ranks: every prompt's answers stay on one rank, so two ranks (each with half of a
rollout's groups) give exactly the advantages one rank gives on the whole rollout, for every estimator, including
REINFORCE++'s normalisation over the whole batch (summed over the ranks)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from omegaconf import OmegaConf

ESTIMATORS = ["grpo", "dr_grpo", "rloo", "reinforce_pp"]


def rollout(groups: int = 4, n: int = 4, width: int = 6) -> dict[str, torch.Tensor]:
    """A made-up rollout of `groups` prompts x n answers: scores, log-probs, answer masks of different lengths."""
    g = torch.Generator().manual_seed(0)
    size = groups * n
    lengths = torch.randint(1, width + 1, (size,), generator=g)
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).float()
    return {
        "scores": torch.randint(0, 3, (size,), generator=g).float(),
        "logprobs": -torch.rand(size, width, generator=g) * mask,
        "ref_logprobs": -torch.rand(size, width, generator=g) * mask,
        "mask": mask,
        "groups": torch.arange(groups).repeat_interleave(n),
    }


def advantages_on(rank: int, world: int, port: int, rows: slice, placement: str, out: dict) -> None:
    """One rank: init the process group (gloo), compute the advantages of its rows as the GRPO recipe does."""
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(env, LOCAL_RANK=str(rank))
    import deepspeed

    from runner.rl import advantages
    from runner.rl.experience import Experience
    from runner.stages.grpo.recipe import advantages_of

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    data = rollout()
    part = {k: v[rows] for k, v in data.items()}
    exp = Experience(
        input_ids=torch.zeros(len(part["scores"]), part["mask"].size(1) + 1, dtype=torch.long),
        attention_mask=torch.ones(len(part["scores"]), part["mask"].size(1) + 1),
        action_mask=part["mask"],
        logprobs=part["logprobs"],
        scores=part["scores"],
        entropy=torch.zeros(1),
        ref_logprobs=part["ref_logprobs"],
        groups=part["groups"],
    )
    for name in ESTIMATORS:
        step = OmegaConf.create({"kl": {"placement": placement, "coef": 0.1}, "gamma": 1.0})
        out[(name, rank)] = advantages_of(exp, advantages.get(name), step, torch.device("cpu")).tolist()
    torch.distributed.destroy_process_group()


def _worker(rank, world, port, placement, queue):
    out = {}
    size = len(rollout()["scores"])
    rows = slice(rank * size // world, (rank + 1) * size // world)
    advantages_on(rank, world, port, rows, placement, out)
    queue.put(out)


def run(world: int, placement: str) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, placement, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out = {}
    for _ in procs:
        out.update(queue.get(timeout=120))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return out


@pytest.mark.parametrize("placement", ["reward", "loss"])
def test_two_ranks_give_one_ranks_advantages(placement):
    one, two = run(1, placement), run(2, placement)
    for name in ESTIMATORS:
        whole = torch.tensor(one[(name, 0)])
        split = torch.cat([torch.tensor(two[(name, 0)]), torch.tensor(two[(name, 1)])])
        torch.testing.assert_close(split, whole, msg=name)
        assert whole.abs().sum() > 0, name  # (a rollout whose advantages are all zero would prove nothing)
