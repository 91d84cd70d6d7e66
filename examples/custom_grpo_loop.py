"""A GRPO training loop of your own, on the runner's pieces (runner.api). The driver half plans the run and launches
this file on every rank (through DeepSpeed's launcher); each rank builds GRPO's engines and drives rollout and
update itself.

    python examples/custom_grpo_loop.py step.init_from=outputs/sft/<run>/export      # + any overrides
    python examples/custom_grpo_loop.py step.init_from=... step.rollout.n=8 deployment.nproc_per_node=2

By default: the tiny data on this CPU, judged by the tiny task's ground truth (reward=tiny), 4 steps of 4 prompts
x 4 answers (without step.init_from, the tiny model starts from random weights).
"""

import sys
from pathlib import Path

from runner import api

DEFAULTS = [
    "step=grpo",
    "reward=tiny",
    "deployment=cpu",
    "train.max_steps=4",
    "step.rollout.prompts=4",
    "step.rollout.n=4",
    "step.max_prompt_len=32",
    "step.generation.max_new_tokens=16",
    "train.eval_max_batches=2",
    "optimizer.lr=3e-4",
]


def train(run_dir: str) -> None:
    """What every rank runs: the same calls in the same order (the ranks meet in collectives)."""
    with api.Session(run_dir) as session:
        trainer = session.trainer()  # the policy's engine, the frozen reference, the judge, the prompts
        before = trainer.evaluate()["reward_mean"]  # answers to held-out prompts, sampled with a fixed seed
        for step in range(1, session.total_steps + 1):
            rollout = trainer.generate_experience()  # n answers per prompt, scored, group-relative advantages
            stats = trainer.train(rollout, step)  # the clipped surrogate + KL to the reference; optimizer steps
            session.log(step, stats)
        after = trainer.evaluate()["reward_mean"]
        session.log(step, {"reward_mean": after}, prefix="eval")
        session.finish(trainer, eval_reward_initial=before, eval_reward_final=after, eval_reward_gain=after - before)


if __name__ == "__main__":
    if len(sys.argv) == 2 and (Path(sys.argv[1]) / "config.yaml").is_file():  # a rank, started by the launcher
        train(sys.argv[1])
    else:  # the driver: plan, write the run directory, launch this file on every rank, wait for them
        result = api.launch(DEFAULTS + sys.argv[1:], worker=__file__)
        print(f"custom loop: {result.status}, {result.summary['steps']} steps in {result.run_dir}")
