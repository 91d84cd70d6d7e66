"""Sweep overhead: the wall time of a Hydra multirun against the sum of its points run alone, in one run.

    python bench/bench_sweep.py                      # 4 points: zero=stage0,stage2 x micro-batch 4,8, 10 steps each

Target: at most 2 seconds of overhead per point. The points run alone first, then the sweep; the overhead per point
is (sweep wall time - sum of the points' wall times) / points.
"""

import argparse
import itertools
import subprocess
import sys
import tempfile
import time

COMMON = ["train.max_steps=10", "train.log_every=5", "train.eval_max_batches=2", "train.export=false"]


def timed(cmd, cwd):
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zero", default="stage0,stage2")
    ap.add_argument("--micro", default="4,8")
    args = ap.parse_args()
    cwd = tempfile.mkdtemp(prefix="bench_sweep_")
    points = list(itertools.product(args.zero.split(","), args.micro.split(",")))
    runner = [sys.executable, "-m", "runner"]
    timed(runner + COMMON + ["train.max_steps=1"], cwd)  # warm the data cache and the JIT-built ops
    alone = [timed(runner + COMMON + [f"zero={z}", f"train.micro_batch_size={m}"], cwd) for z, m in points]
    sweep = timed(
        runner + ["-m", f"zero={args.zero}", f"train.micro_batch_size={args.micro}", "sweep_name=bench"] + COMMON, cwd
    )
    per_point = (sweep - sum(alone)) / len(points)
    print(f"points: {len(points)}   alone: {sum(alone):.1f} s in total   sweep: {sweep:.1f} s")
    print("| metric | value | target |\n|---|---|---|")
    print(f"| sweep / sum of points alone | {sweep / sum(alone):.3f} | |")
    print(f"| overhead per point (s) | {per_point:+.2f} | <= 2 |")


if __name__ == "__main__":
    main()
