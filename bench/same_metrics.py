"""Do two revisions train the same? Runs the tiny SFT -> reward -> PPO pipeline (recipe=rlhf_tiny: CPU, fp32, one
rank) with the runner of a base revision and with this checkout's, and compares every per-step metric the two
write (losses, rewards, KL, accuracies, learning rates; not timings or memory) to a tolerance.

    python bench/same_metrics.py --base 10cd144 --this reward=none   # the commit before the stage plug-in redesign
    python bench/same_metrics.py --base HEAD~1 --tol 1e-6 [extra overrides for both runs ...]

Exit code 0 when every compared value agrees within --tol (absolute, or relative for values above 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._revisions import checkout  # noqa: E402

NOT_COMPARED = ("time", "per_s", "peak_memory", "epoch")  # wall-clock and memory figures differ run to run


def run_pipeline(tree: Path, out: Path, overrides: list[str]) -> Path:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "runner", "recipe=rlhf_tiny", f"run_dir={out}", *overrides]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed in {tree}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return out


def rows(path: Path) -> dict[tuple[int, str], float]:
    out = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not any(s in key for s in NOT_COMPARED):
                out[record["step"], key] = float(value)
    return out


def compare(a: Path, b: Path, tol: float) -> tuple[int, float, list[str]]:
    ra, rb = rows(a), rows(b)
    common = sorted(set(ra) & set(rb))
    worst, bad = 0.0, []
    for k in common:
        x, y = ra[k], rb[k]
        diff = abs(x - y) / max(1.0, abs(x)) if math.isfinite(x) and math.isfinite(y) else (0.0 if x == y else math.inf)
        worst = max(worst, diff)
        if diff > tol:
            bad.append(f"step {k[0]} {k[1]}: {x!r} vs {y!r}")
    only = sorted({k[1] for k in set(ra) ^ set(rb)})
    if only:
        bad.append(f"metrics written by one revision only (not compared): {only}")
    return len(common), worst, bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare against (e.g. 10cd144)")
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument(
        "--this",
        action="append",
        default=[],
        help="an override for this checkout's run only, to undo a deliberate change of defaults (e.g. reward=none: "
        "the tiny recipe now judges held-out answers by the task's ground truth, not by the reward model)",
    )
    parser.add_argument("overrides", nargs="*", help="extra overrides for both pipelines")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="same-metrics-"))
    with checkout(args.base) as base_tree:
        base = run_pipeline(base_tree, tmp / "base", args.overrides)
    head = run_pipeline(Path(__file__).resolve().parent.parent, tmp / "head", [*args.overrides, *args.this])
    failed = False
    print(f"{'stage':8} {'values':>7} {'max rel diff':>13}  verdict   (base {args.base} vs this checkout)")
    for stage in ("sft", "reward", "ppo"):
        n, worst, bad = compare(base / stage / "metrics.jsonl", head / stage / "metrics.jsonl", args.tol)
        verdict = "same" if n and not [b for b in bad if b.startswith("step")] else "DIFFERENT"
        failed |= verdict != "same"
        print(f"{stage:8} {n:7d} {worst:13.3g}  {verdict}")
        for line in bad[:10]:
            print(f"    {line}")
    print(f"runs kept in {tmp}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
