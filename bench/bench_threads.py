"""Torch threads per CPU rank against the model's size: the runner's SFT tokens/s on one thread vs several, for the
tiny model grown to a few sizes; what `deployment.threads_per_rank: auto` decides from
(runner/driver/deployment.py: ONE_THREAD_BELOW).

    python bench/bench_threads.py                                   # 1 vs 2 threads, 3 sizes, 2 rounds
    python bench/bench_threads.py --sizes 0.56m --variants 1,2,2:active,2:spin1000 --rounds 3
    python bench/bench_threads.py --sizes 0.56m --busy 1            # a CPU shared with one other busy process

A variant is THREADS[:WAIT]: deployment.threads_per_rank=THREADS, and WAIT the idle OpenMP threads' policy:
passive (the default), active (deployment.omp_wait_policy=null: OpenMP's spin) or spinN (GOMP_SPINCOUNT=N: spin N
times, then sleep). `--busy N` keeps N other processes busy meanwhile. Each round runs every (size, variant) once,
in turn, so that a change of the machine's load slows all alike; per run, the median interval tokens/s after the
first interval. Prints the medians over rounds and each variant's ratio to the first variant (> 1: faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.bench_sft import run_runner  # noqa: E402

SIZES = {  # parameters -> the tiny model's architecture grown (hidden, layers, ffn); its vocabulary stays 1024
    "0.56m": (128, 2, 512),
    "3.4m": (256, 4, 1024),
    "13m": (512, 4, 2048),
}


def overrides(size: str, threads: str, wait: str) -> tuple[list[str], dict]:
    hidden, layers, ffn = SIZES[size]
    args = [
        f"model.arch.hidden_size={hidden}",
        f"model.arch.word_embed_proj_dim={hidden}",
        f"model.arch.num_hidden_layers={layers}",
        f"model.arch.ffn_dim={ffn}",
        "model.num_params=null",
        "model.largest_layer_params=null",
        f"deployment.threads_per_rank={threads}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if wait == "active":
        args.append("deployment.omp_wait_policy=null")
    elif wait.startswith("spin"):
        args.append("deployment.omp_wait_policy=null")
        env["GOMP_SPINCOUNT"] = wait[4:]
    return args, env


def tokens_per_s(cwd: str, steps: int, args: list[str], env: dict) -> float:
    """The median interval tokens/s of one SFT run (bench_sft.run_runner: warm-up and final interval dropped)."""
    return statistics.median(run_runner(cwd, "stage0", steps, 10, REPO, args, {**env, "HF_HUB_OFFLINE": "1"})[1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"of {', '.join(SIZES)}")
    ap.add_argument("--variants", default="1,2", help="THREADS[:passive|active|spinN], ...")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--busy", type=int, default=0, help="other busy processes during the measurements")
    args = ap.parse_args()
    sizes = args.sizes.split(",")
    if unknown := [s for s in sizes if s not in SIZES]:
        raise SystemExit(f"error: --sizes: unknown {unknown} (choose from {', '.join(SIZES)})")
    variants = [tuple(v.split(":")) if ":" in v else (v, "passive") for v in args.variants.split(",")]
    cwd = tempfile.mkdtemp(prefix="bench_threads_")
    got = {(s, v): [] for s in sizes for v in variants}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        tokens_per_s(cwd, 30, overrides(sizes[0], "1", "")[0], dict(os.environ))  # the data cache: not measured
        for r in range(args.rounds):
            for size in sizes:
                for threads, wait in variants:
                    got[size, (threads, wait)].append(tokens_per_s(cwd, args.steps, *overrides(size, threads, wait)))
            print(f"round {r + 1} done", flush=True)
    finally:
        for p in busy:
            p.kill()
    print(f"\nSFT tokens/s, medians over {args.rounds} rounds of {args.steps} steps; {args.busy} busy processes")
    print("| parameters | " + " | ".join(f"{t} thread(s), {w}" for t, w in variants) + " |")
    print("|---" * (len(variants) + 1) + "|")
    for size in sizes:
        med = [statistics.median(got[size, v]) for v in variants]
        cells = [f"{m:.0f}" + (f" ({m / med[0]:.2f}x)" if i else "") for i, m in enumerate(med)]
        print(f"| {size} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
