"""Packed vs unpacked SFT (data.packing) on data of mixed lengths: the ratio of useful tokens/s, and the padding share
of each, measured in one run.

    python bench/bench_packing.py                   # tiny model, 1 CPU rank, 30 steps per run, 2 rounds
    python bench/bench_packing.py --steps 60 --rounds 3

The data: synthetic prompt/response rows whose token lengths vary 10x (about 14 to 136 tokens, 75 on average),
written to a temporary jsonl and read with `data=local`; data.max_seq_len=256 (the tiny model's positions). Both
variants train the tiny model on the same tokenised samples with the same seed. Unpacked, each micro-batch is
`--micro` samples padded to its longest (about 600 real tokens); packed, `--packed-micro` rows of samples packed up
to 256 tokens (about 500 real tokens: fewer, so that a larger batch does not favour packing). Useful tokens are the
loss-bearing ones (the response tokens): the runner logs real (non-pad) tokens/s, and the share of them that bear a
loss is a property of the data set, the same for both variants, so the ratio of useful tokens/s is the ratio of real
tokens/s. Each run's first logging interval is dropped as warm-up (and its last, which holds the end-of-run
bookkeeping); the median interval over all rounds is compared, alternating which variant runs first in each round so
that drift of a shared machine cancels.
"""

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_sft import run_runner  # noqa: E402

WORDS = "the river was splendid and excellent pizza charming rude perfect poor awful gloomy cheerful brilliant".split()


def write_data(path: Path, rows: int, seed: int) -> None:
    """Prompt/response rows of about 14 to 136 tokens (the response: 1 to 120 words of the tiny tokenizer)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 120)))
            prompt = f"\n\nHuman: tell me about the {rng.choice(WORDS)}\n\nAssistant:"
            f.write(json.dumps({"prompt": prompt, "response": " " + words + " ."}) + "\n")


def run(cwd: str, data: Path, packed: bool, micro: int, steps: int, log_every: int) -> tuple[list[float], float]:
    """One SFT run on `data` (bench_sft.run_runner: no evaluation, checkpoint or export); its interval tokens/s and
    mean padding share, the warm-up and the last interval dropped."""
    extra = [
        "data=local",
        f"data.sets.local.path={data}",
        "data.split=[1,0,0]",
        "data.sets.local.sft_target=response",
        "data.max_seq_len=256",
        f"data.packing={str(packed).lower()}",
        f"train.micro_batch_size={micro}",
    ]
    run_dir, _, _ = run_runner(cwd, "stage0", steps, log_every, extra=extra)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/tokens_per_s" in r][1:-1]  # warm-up and the last interval dropped
    return [r["train/tokens_per_s"] for r in train], statistics.mean(r["train/padding_share"] for r in train)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--micro", type=int, default=8, help="unpacked: samples per micro-batch")
    ap.add_argument("--packed-micro", type=int, default=2, help="packed: rows of up to 256 tokens per micro-batch")
    args = ap.parse_args()
    cwd = tempfile.mkdtemp(prefix="bench_packing_")
    data = Path(cwd) / "mixed.jsonl"
    write_data(data, args.rows, seed=0)
    tps: dict[bool, list[float]] = {False: [], True: []}
    padding: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.rounds):
        for packed in (False, True) if i % 2 == 0 else (True, False):
            micro = args.packed_micro if packed else args.micro
            got, pad = run(cwd, data, packed, micro, args.steps, args.log_every)
            tps[packed] += got
            padding[packed].append(pad)
        print(
            f"round {i + 1}: unpacked {statistics.median(tps[False]):.0f}, packed {statistics.median(tps[True]):.0f} "
            "real tokens/s (medians so far)",
            flush=True,
        )
    ratio = statistics.median(tps[True]) / statistics.median(tps[False])
    print(f"\nsteps={args.steps} rounds={args.rounds} intervals={len(tps[False])}+{len(tps[True])}")
    print("| metric | unpacked | packed |\n|---|---|---|")
    print(f"| padding share of computed tokens | {statistics.mean(padding[False]):.1%} | "
          f"{statistics.mean(padding[True]):.1%} |")  # fmt: skip
    print(f"| useful tokens/s, packed / unpacked (median intervals) | 1 | {ratio:.2f} |")


if __name__ == "__main__":
    main()
