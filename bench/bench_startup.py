"""The driver's own time around a run, measured on real runs of this checkout (and of --base REV, interleaved):

    (a) start-up: from `python -m runner` starting to the launcher being started (the `launch:` line, printed just
        before the driver starts it); target < 2 s;
    (b) shut-down: from the last rank's end (`ended` in ranks/<r>.json, written by the rank as its loop returns: its
        own teardown and DeepSpeed's launcher noticing its exit are counted) to `python -m runner` having exited;
        target < 1 s;
    (c) the driver's own part of (b): from its `done in` line (printed once the launcher returned and status.json is
        written) to its exit: the curves (drawn meanwhile), the model card, the interpreter's exit.

    python bench/bench_startup.py                     # default run, step=ppo with exports, recipe=dpo_tiny; 3 rounds
    python bench/bench_startup.py --base ec2b900 --rounds 3

Each case runs a few steps only. Medians over the rounds per case and revision; with --base, the two revisions run in
alternating order in every round and the ratio this/base is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # (bench._revisions, when run as a script)
SHORT = ["train.eval_max_batches=1", "train.save_every=0"]


def run(root: Path, cwd: str, overrides: list[str]) -> tuple[float, float, list[Path], float]:
    """One `python -m runner` of the code at `root`: (a), (b), its run directories and (c)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    began = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner", *overrides],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    launched, dirs, tail, done = None, [], [], None
    for line in proc.stdout:
        if line.startswith("done in "):
            done = time.perf_counter()
        if launched is None and line.startswith(("launch: ", "launching ")):  # (the quiet console: "launching")
            launched = time.perf_counter() - began
        if line.startswith("run directory: "):
            dirs.append(Path(cwd, line.split(": ", 1)[1].strip()))
        tail = (tail + [line])[-30:]
    rc = proc.wait()
    exited, own = time.time(), time.perf_counter() - (done or began)
    if rc or launched is None:
        raise SystemExit(f"error: python -m runner {' '.join(overrides)} ({root}) exited with {rc}:\n{''.join(tail)}")
    ended = max(json.loads(p.read_text())["ended"] for p in (dirs[-1] / "ranks").glob("*.json"))
    return launched, exited - ended, dirs, own


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="a git revision to compare with, interleaved")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default="default,ppo,recipe")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    from bench._revisions import checkout

    with checkout(args.base or "current") as base:
        roots = {"this": REPO, **({"base": base} if args.base else {})}
        cwd = tempfile.mkdtemp(prefix="bench_startup_")
        # exports for PPO (and the data caches): made once, not measured
        sft = run(REPO, cwd, ["step=sft", "train.max_steps=4", *SHORT])[2][-1]
        reward = run(REPO, cwd, ["step=reward", "train.max_steps=4", *SHORT])[2][-1]
        cases = {
            "default": ["train.max_steps=4", *SHORT],
            "ppo": [
                "step=ppo",
                f"step.actor_from={sft / 'export'}",
                f"step.critic_from={reward / 'export'}",
                "train.max_steps=1",
                *SHORT,
            ],
            "recipe": ["recipe=dpo_tiny", "train.max_steps=3", *SHORT],
        }
        cases = {k: v for k, v in cases.items() if k in args.cases.split(",")}
        for root in roots.values():  # each revision's first run (imports, byte code) is not measured
            run(root, cwd, cases[next(iter(cases))])
        times = {(c, w): ([], [], []) for c in cases for w in roots}
        for i in range(args.rounds):
            for case, overrides in cases.items():
                order = list(roots.items()) if i % 2 == 0 else list(roots.items())[::-1]
                for who, root in order:
                    a, b, _, c = run(root, cwd, overrides)
                    for got, value in zip(times[case, who], (a, b, c)):
                        got.append(value)
                    print(f"round {i + 1} {case} {who}: start-up {a:.2f} s, shut-down {b:.2f} s (driver {c:.2f} s)")
    med = {k: tuple(statistics.median(v) for v in got) for k, got in times.items()}
    print(f"\nrounds={args.rounds}" + (f" base={args.base}" if args.base else ""))
    head = "| case | (a) start-up this | (b) shut-down this | (c) driver's part this |"
    head += " (a) base | (b) base | (c) base |" if args.base else ""
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for case in cases:
        row = f"| {case} | " + " | ".join(f"{v:.2f} s" for v in med[case, "this"]) + " |"
        if args.base:
            row += " " + " | ".join(f"{v:.2f} s" for v in med[case, "base"]) + " |"
        print(row)
    print("targets: start-up < 2 s, shut-down < 1 s")


if __name__ == "__main__":
    main()
