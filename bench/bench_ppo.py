"""Time per PPO step of the tiny recipe, split into generation, experience (the four models' forward passes) and
training, printed as a table; one rank at ZeRO-0 and two ranks with ZeRO-3 actor and critic.

    python bench/bench_ppo.py                       # runs the tiny SFT and reward stages first (~1 min), then PPO
    python bench/bench_ppo.py --sft DIR --reward DIR --steps 40

Medians over the steps after the first 3 (warm-up); ratios are within one run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY_PPO = [
    "data.sets.tiny.splits.eval=heldout",
    "step.generation_batch_size=32",
    "train.micro_batch_size=16",
    "step.max_prompt_len=32",
    "step.generation.max_new_tokens=16",
    "optimizer.lr=1e-4",
    "step.critic.lr=1e-4",
    "scheduler.warmup_steps=5",
    "train.eval_every=0",
    "train.eval_max_batches=1",
    "train.export=false",
    "step.print_answers_every=0",
]
SETUPS = {
    "1 rank, ZeRO-0": ["deployment=cpu"],
    "2 ranks, ZeRO-3 actor + critic": [
        "deployment=cpu",
        "deployment.nproc_per_node=2",
        "zero=stage3",
        "zero@step.critic.zero=stage3",
        "train.micro_batch_size=8",
        "step.generation_batch_size=16",
    ],
}


def runner(cwd: Path, *overrides: str) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "runner", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if proc.returncode:
        sys.exit(f"runner failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return Path(re.search(r"^run directory: (.+)$", proc.stdout, re.MULTILINE).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft"), ap.add_argument("--reward")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_ppo_"))
    sft = Path(args.sft) if args.sft else runner(work, "train.max_steps=300") / "export"
    reward = (
        Path(args.reward)
        if args.reward
        else runner(work, "step=reward", f"step.init_from={sft}", "train.max_steps=150") / "export"
    )
    print("| setup | generation s | experience s | training s | step s | generation share | answers/s |")
    print("|---|---|---|---|---|---|---|")
    for name, extra in SETUPS.items():
        run = runner(
            work,
            "step=ppo",
            f"step.actor_from={sft}",
            f"step.critic_from={reward}",
            *TINY_PPO,
            *extra,
            f"train.max_steps={args.steps}",
        )
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "train/gen_time_s" in r][3:]
        med = {
            k: statistics.median(r[f"train/{k}"] for r in rows)
            for k in ("gen_time_s", "experience_time_s", "train_time_s", "step_time_s")
        }
        world = json.loads((run / "summary.json").read_text())["world_size"]
        gen_bs = int(next(o.split("=")[1] for o in reversed(TINY_PPO + extra) if o.startswith("step.generation_b")))
        print(
            f"| {name} | {med['gen_time_s']:.3f} | {med['experience_time_s']:.3f} | {med['train_time_s']:.3f} | "
            f"{med['step_time_s']:.3f} | {med['gen_time_s'] / med['step_time_s']:.0%} | "
            f"{gen_bs * world / med['step_time_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
