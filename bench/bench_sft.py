"""Runner SFT vs a minimal hand-written DeepSpeed loop: tokens/s ratio and padding share, measured in one run.

    python bench/bench_sft.py                       # tiny model, ZeRO-0, 1 CPU rank, 300 steps, 4 rounds
    python bench/bench_sft.py --zero stage2 --steps 400 --rounds 3
    python bench/bench_sft.py --base ec2b900        # this checkout vs revision ec2b900: SFT and the reward stage
    python bench/bench_sft.py --base ec2b900 --ranks 2 --zero stage2 --stages sft
    python bench/bench_sft.py --base ec2b900 --set deployment.threads_per_rank=1   # both on one thread per rank
    python bench/bench_sft.py --base ec2b900 --this deployment.omp_wait_policy=null  # OpenMP's spin, as ec2b900

With --base REV it compares this checkout's runner with REV's (a worktree of it, bench/_revisions.py) instead of the
hand-written loop: per stage, the two run in alternating order in each round, and the ratio this/base of the median
interval tokens/s (warm-up and the last interval dropped) is printed with the loss each logged at its last step.

Both loops run through the same `deepspeed` launcher with the same ds_config.json, model architecture, tokenised
data, micro-batch size and thread count; the first logging interval of each is dropped as warm-up and the median
interval throughput over all rounds is compared, alternating which loop runs first in each round. Targets: ratio
>= 0.95, padding share < 10% on the tiny data set.
"""

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
sys.path.insert(0, str(REPO))  # (bench._revisions, when run as a script)


def after_warmup(values):
    return values[1:] if len(values) > 1 else values


def run_runner(cwd, zero, steps, log_every, root=REPO, extra=(), env=None):
    """One run of the runner whose code is at `root` (in `env`, default this process's environment); -> run dir, its
    interval tokens/s, mean padding share."""
    cmd = [
        sys.executable,
        "-m",
        "runner",
        f"zero={zero}",
        *extra,
        f"train.max_steps={steps}",
        f"train.log_every={log_every}",
        "train.eval_every=0",
        "train.eval_max_batches=1",
        "train.save_every=0",
        "train.export=false",
    ]
    env = {**(os.environ if env is None else env), "PYTHONPATH": str(root)}  # the ranks import the driver's tree
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} in {root} failed:\n{done.stderr[-3000:]}")
    out = done.stdout
    run_dir = Path(re.search(r"^run directory: (.+)$", out, re.MULTILINE).group(1))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/tokens_per_s" in r]
    # the last interval also holds the final checkpoint/eval bookkeeping of the loop: drop it like the warm-up
    tps = [r["train/tokens_per_s"] for r in train[:-1]]
    return run_dir, after_warmup(tps), statistics.mean(r["train/padding_share"] for r in train)


def run_hand(cwd, run_dir, steps, log_every):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    cmd = [
        "deepspeed",
        "--num_gpus",
        "1",
        "--no_local_rank",
        str(REPO / "bench" / "hand_sft_loop.py"),
        str(run_dir),
        str(steps),
        str(log_every),
    ]
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True, env=env).stdout
    rows = [json.loads(x) for x in out.splitlines() if x.startswith('{"step"')]
    return after_warmup([r["tokens_per_s"] for r in rows[:-1]])


def last_loss(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r][-1]


def compare_revisions(args):
    """This checkout vs --base: tokens/s ratio per stage, interleaved rounds."""
    from bench._revisions import checkout

    extra = ["deployment=cpu", f"deployment.nproc_per_node={args.ranks}"] if args.ranks > 1 else []
    extra += args.set
    rows = []
    with checkout(args.base) as base:
        for stage in args.stages.split(","):
            tps, losses, paired = {"this": [], "base": []}, {"this": [], "base": []}, []
            cwd = tempfile.mkdtemp(prefix=f"bench_sft_{stage}_")
            over = [f"step={stage}", *extra]
            for root in (REPO, base):  # data caches, imports: not measured
                run_runner(cwd, args.zero, args.log_every * 2, args.log_every, root, over)
            for i in range(args.rounds):
                order = (("this", REPO), ("base", base)) if i % 2 == 0 else (("base", base), ("this", REPO))
                this_round = {}
                for who, root in order:
                    own = over + args.this if who == "this" else over
                    run_dir, t, _ = run_runner(cwd, args.zero, args.steps, args.log_every, root, own)
                    tps[who] += t
                    this_round[who] = statistics.median(t)
                    losses[who].append(last_loss(run_dir))
                paired.append(this_round["this"] / this_round["base"])  # neighbours in time: drift cancels
                med = {k: statistics.median(v) for k, v in tps.items()}
                line = f"{stage} round {i + 1}: this {med['this']:.0f}, base {med['base']:.0f} tokens/s (medians)"
                print(line, flush=True)
            ratio = statistics.median(tps["this"]) / statistics.median(tps["base"])
            rows.append(
                (stage, ratio, statistics.median(paired), len(tps["this"]), losses["this"][-1], losses["base"][-1])
            )
    setting = f"base={args.base} zero={args.zero} ranks={args.ranks} steps={args.steps} rounds={args.rounds}"
    print("\n" + setting, *args.set, *args.this)
    print("| stage | this/base: median intervals | this/base: median of rounds | intervals | last loss this, base |")
    print("|---|---|---|---|---|")
    for stage, ratio, pair, n, a, b in rows:
        print(f"| {stage} | {ratio:.3f} | {pair:.3f} | {n} each | {a:.4f}, {b:.4f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zero", default="stage0")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--base", help="a git revision to compare this checkout with (instead of the hand-written loop)")
    ap.add_argument("--stages", default="sft,reward", help="with --base: the stages compared")
    ap.add_argument("--ranks", type=int, default=1, help="with --base: CPU ranks (deployment=cpu)")
    ap.add_argument("--set", action="append", default=[], help="with --base: an override for both revisions' runs")
    ap.add_argument("--this", action="append", default=[], help="with --base: an override for this checkout's runs")
    args = ap.parse_args()
    if args.base:
        return compare_revisions(args)
    cwd = tempfile.mkdtemp(prefix="bench_sft_")
    runner_tps, hand_tps, padding = [], [], []
    run_dir = run_runner(cwd, args.zero, args.steps, args.log_every)[0]  # the data cache and a run dir for the baseline
    for i in range(args.rounds):  # alternate which loop goes first, so that drift of a shared machine cancels
        order = ("runner", "hand") if i % 2 == 0 else ("hand", "runner")
        for which in order:
            if which == "runner":
                run_dir, tps, pad = run_runner(cwd, args.zero, args.steps, args.log_every)
                runner_tps += tps
                padding.append(pad)
            else:
                hand_tps += run_hand(cwd, run_dir, args.steps, args.log_every)
        print(
            f"round {i + 1}: runner {statistics.median(runner_tps):.0f} tokens/s, hand-written loop "
            f"{statistics.median(hand_tps):.0f} tokens/s (medians so far)",
            flush=True,
        )
    ratio = statistics.median(runner_tps) / statistics.median(hand_tps)
    print(f"\nzero={args.zero} steps={args.steps} rounds={args.rounds} intervals={len(runner_tps)}+{len(hand_tps)}")
    print("| metric | value | target |\n|---|---|---|")
    print(f"| runner / hand-written tokens per second (median intervals) | {ratio:.3f} | >= 0.95 |")
    print(f"| padding share of computed tokens (runner) | {statistics.mean(padding):.1%} | < 10% |")


if __name__ == "__main__":
    main()
