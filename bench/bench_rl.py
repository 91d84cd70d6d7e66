"""Time per PPO and per GRPO iteration of the tiny recipes, this checkout against another git revision, in one run:
the runs of the two revisions are interleaved (base, this, base, this, ... for every setup and round), so a machine
whose load changes during the benchmark slows both alike. Prints each revision's median seconds per step (and its
generation / experience / training split), the ratio base / this (> 1: this checkout is faster) and the range of the
rounds' ratios (the machine's noise).

    python bench/bench_rl.py --base ec2b900                  # tiny SFT and reward stages first (~1 min), then the runs
    python bench/bench_rl.py --base ec2b900 --sft DIR --reward DIR --steps 20 --rounds 3 --only ppo
    python bench/bench_rl.py --base ec2b900 --ranks 1 --this deployment.omp_wait_policy=null   # the code's share
    python bench/bench_rl.py --base ec2b900 --ranks 1 --set deployment.threads_per_rank=1      # both on one thread

Setups: 1 rank at ZeRO-0, and 2 ranks with ZeRO-3 (PPO: actor and critic). Per run: the median over the steps after
the first 3 (warm-up); per setup: the median over rounds of the per-round ratio.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._revisions import checkout  # noqa: E402
from bench.bench_ppo import SETUPS as PPO_SETUPS, TINY_PPO  # noqa: E402

TINY_GRPO = [  # conf/recipe/grpo_tiny.yaml's GRPO stage
    "reward=tiny",
    "data.split={sft:2,grpo:8}",
    "data.sets.tiny.splits.eval=heldout",
    "step.rollout.prompts=8",
    "step.rollout.n=4",
    "train.micro_batch_size=16",
    "step.max_prompt_len=32",
    "step.generation.max_new_tokens=16",
    "optimizer.lr=3e-4",
    "scheduler.warmup_steps=2",
    "train.eval_every=0",
    "train.eval_max_batches=1",
    "train.export=false",
    "step.print_answers_every=0",
]
GRPO_SETUPS = {
    "1 rank, ZeRO-0": ["deployment=cpu"],
    "2 ranks, ZeRO-3": ["deployment=cpu", "deployment.nproc_per_node=2", "zero=stage3", "train.micro_batch_size=8"],
}
PARTS = ("gen_time_s", "experience_time_s", "train_time_s", "step_time_s")


def runner(tree: Path, cwd: Path, *overrides: str) -> Path:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree)}
    proc = subprocess.run(
        [sys.executable, "-m", "runner", *overrides], cwd=tree, capture_output=True, text=True, env=env
    )
    if proc.returncode:
        sys.exit(f"runner failed in {tree}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return Path(re.search(r"^run directory: (.+)$", proc.stdout, re.MULTILINE).group(1))


def medians(run: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/step_time_s" in r][3:]
    return {k: statistics.median(r[f"train/{k}"] for r in rows) for k in PARTS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the git revision to compare with (e.g. ec2b900)")
    ap.add_argument("--sft"), ap.add_argument("--reward")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", choices=("ppo", "grpo"))
    ap.add_argument("--ranks", type=int, choices=(1, 2), help="only the setups of this many ranks")
    ap.add_argument("--this", action="append", default=[], help="an override for this checkout's runs only")
    ap.add_argument("--set", action="append", default=[], help="an override for both revisions' runs")
    args = ap.parse_args()
    here = Path(__file__).resolve().parent.parent
    work = Path(tempfile.mkdtemp(prefix="bench_rl_"))
    sft = Path(args.sft) if args.sft else runner(here, work, "train.max_steps=300", f"run_dir={work}/sft") / "export"
    reward = Path(args.reward) if args.reward else None
    if reward is None and args.only != "grpo":
        reward = runner(here, work, "step=reward", f"step.init_from={sft}", "train.max_steps=150", f"run_dir={work}/rw")
        reward = reward / "export"
    cases = []
    if args.only != "grpo":
        ppo = ["step=ppo", f"step.actor_from={sft}", f"step.critic_from={reward}", *TINY_PPO]
        cases += [("PPO", name, ppo + extra) for name, extra in PPO_SETUPS.items()]
    if args.only != "ppo":
        cases += [
            ("GRPO", name, ["step=grpo", f"step.init_from={sft}", *TINY_GRPO, *extra])
            for name, extra in GRPO_SETUPS.items()
        ]
    cases = [c for c in cases if not args.ranks or c[1].startswith(str(args.ranks))]
    results: dict[tuple[str, str], list[tuple[dict, dict]]] = {}
    with checkout(args.base) as base:
        for r in range(args.rounds):
            for method, name, overrides in cases:
                got = {}
                for label, tree, own in (("base", base, args.set), ("this", here, args.set + args.this)):
                    out = work / f"{method}-{name[0]}-{label}-{r}"
                    got[label] = medians(
                        runner(tree, work, *overrides, *own, f"train.max_steps={args.steps}", f"run_dir={out}")
                    )
                results.setdefault((method, name), []).append((got["base"], got["this"]))
                print(
                    f"round {r + 1} {method} {name}: base {got['base']['step_time_s']:.3f} s, "
                    f"this {got['this']['step_time_s']:.3f} s",
                    flush=True,
                )
    print(f"\nbase = {args.base}, this = the checkout; medians over rounds of seconds per step (gen / exp / train)")
    print("| method | setup | base s/step | this s/step | base/this | rounds | generation | experience | training |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (method, name), pairs in results.items():
        base_s = statistics.median(b["step_time_s"] for b, _ in pairs)
        this_s = statistics.median(t["step_time_s"] for _, t in pairs)
        ratio = {k: statistics.median(b[k] / t[k] for b, t in pairs) for k in PARTS}
        rounds = [b["step_time_s"] / t["step_time_s"] for b, t in pairs]  # the spread: this machine's noise
        print(
            f"| {method} | {name} | {base_s:.3f} | {this_s:.3f} | {ratio['step_time_s']:.2f}x | "
            f"{min(rounds):.2f}-{max(rounds):.2f}x | "
            f"{ratio['gen_time_s']:.2f}x | {ratio['experience_time_s']:.2f}x | {ratio['train_time_s']:.2f}x |"
        )


if __name__ == "__main__":
    main()
