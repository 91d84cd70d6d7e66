"""Population-based training (Jaderberg et al., 2017) over runner runs.

    python -m runner.pbt --population 4 --interval 10 --generations 4 \\
        --init optimizer.lr=1e-4,3e-4,1e-3,3e-3 --explore optimizer.lr=0.8,1.25 [runner overrides ...]

Each member is a real run directory, `<dir>/member_<i>`, trained by `python -m runner` through the configured
launcher (deepspeed, torchrun or SLURM), one member after another. Every --interval steps each member stops with a
checkpoint (train.stop_at_step), and the members are ranked by their held-out objective (the method's: SFT's eval
loss, lower is better; the reward model's and DPO's accuracy, a policy's judged reward). Each member of the worst
--quantile then copies the checkpoint and hyperparameters of a member of the best quantile (exploit) and multiplies
each explored hyperparameter by one of its factors, drawn at random (explore); every member resumes (`resume=` with
its new values). `<dir>/pbt.json` records every generation (each member's hyperparameters, objective and the member
it copied), `pbt.md` shows the lineage and `objective.png` each member's objective over steps.

Built on the runner's own checkpoints and resume, not on Ray Tune's PBT scheduler: Ray drives trials as functions
inside its own actors, while a runner member is a DeepSpeed launcher's process tree (on one or many nodes) that
stops and resumes through its run directory, which is all an exploit step needs.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

LOWER_IS_BETTER = ("loss", "perplexity")


def parse_values(spec: str) -> tuple[str, list[float]]:
    """'optimizer.lr=1e-4,3e-4' -> ('optimizer.lr', [1e-4, 3e-4])."""
    key, sep, values = spec.partition("=")
    if not sep or not values:
        raise SystemExit(f"error: {spec!r} must be KEY=V1,V2,... (e.g. optimizer.lr=1e-4,3e-4)")
    try:
        return key, [float(v) for v in values.split(",")]
    except ValueError:
        raise SystemExit(f"error: {spec!r}: the values must be numbers") from None


def exploit(objectives: list[float], lower: bool, quantile: float, rng: random.Random) -> dict[int, int]:
    """Member -> the member it copies: each of the worst ceil-less `quantile` share copies one of the best share."""
    order = sorted(range(len(objectives)), key=lambda i: objectives[i], reverse=not lower)  # best first
    k = max(1, int(len(order) * quantile))
    best, worst = order[:k], order[-k:]
    return {w: rng.choice(best) for w in worst if w not in best}


def explore(values: dict[str, float], factors: dict[str, list[float]], rng: random.Random) -> dict[str, float]:
    return {k: v * rng.choice(factors[k]) if k in factors else v for k, v in values.items()}


def member_objective(run_dir: Path, step: int) -> tuple[str, float]:
    """The objective's name and value at `step`: rank 0's record names it, metrics.jsonl holds its evaluations."""
    record = json.loads((run_dir / "ranks" / "0.json").read_text())
    name = record["objective_name"]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    values = [r[f"eval/{name}"] for r in rows if r.get("step") == step and f"eval/{name}" in r]
    if not values:
        raise SystemExit(f"error: {run_dir} has no eval/{name} at step {step}: set train.eval_every to --interval")
    return name, float(values[-1])


def run_member(base: list[str], values: dict[str, float], run_dir: Path, stop: int, total: int, resume: bool) -> None:
    cmd = [
        sys.executable,
        "-m",
        "runner",
        *base,
        *[f"{k}={v:.6g}" for k, v in values.items()],
        f"run_dir={run_dir}",
        f"train.max_steps={total}",
        f"train.stop_at_step={stop if stop < total else 'null'}",
        *([f"resume={run_dir}"] if resume else []),
    ]
    print(f"=== {run_dir.name}: {' '.join(cmd[3:])}", flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"error: member {run_dir.name} failed (exit {proc.returncode}); see {run_dir / 'launch.log'}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.pbt", description=__doc__.split("\n\n")[0])
    parser.add_argument("--population", type=int, default=4)
    parser.add_argument("--interval", type=int, required=True, help="steps between exploit/explore decisions")
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--quantile", type=float, default=0.25, help="share of members that copy the best ones")
    parser.add_argument("--init", action="append", default=[], help="KEY=V1,V2,... one value per member (cycled)")
    parser.add_argument("--explore", action="append", default=[], help="KEY=F1,F2,... factors to perturb by")
    parser.add_argument("--dir", type=Path, default=None, help="the population's directory")
    parser.add_argument("--seed", type=int, default=0)
    args, base = parser.parse_known_args(argv)
    if args.population < 2 or args.interval < 1 or args.generations < 1 or not 0 < args.quantile <= 0.5:
        raise SystemExit("error: need --population >= 2, --interval >= 1, --generations >= 1, 0 < --quantile <= 0.5")
    init, factors = dict(map(parse_values, args.init)), dict(map(parse_values, args.explore))
    if not factors:
        raise SystemExit("error: give at least one --explore KEY=F1,F2,... (e.g. optimizer.lr=0.8,1.25)")
    unknown = set(factors) - set(init)
    if unknown:
        raise SystemExit(f"error: {sorted(unknown)} explored but not given an --init KEY=V1,... value")
    root = (args.dir or Path("outputs/pbt") / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    root.mkdir(parents=True, exist_ok=False)
    rng = random.Random(args.seed)
    base = [*base, f"train.eval_every={args.interval}", f"train.save_every={args.interval}"]
    members = [{k: v[i % len(v)] for k, v in init.items()} for i in range(args.population)]
    total, history, lower = args.interval * args.generations, [], True
    for g in range(1, args.generations + 1):
        stop, scores = args.interval * g, []
        for i, values in enumerate(members):
            run_member(base, values, root / f"member_{i}", stop, total, resume=g > 1)
            name, value = member_objective(root / f"member_{i}", stop)
            scores.append(value)
            lower = any(w in name for w in LOWER_IS_BETTER)
        copies = exploit(scores, lower, args.quantile, rng) if g < args.generations else {}
        history.append(
            {
                "generation": g,
                "step": stop,
                "objective_name": name,
                "members": [
                    {"member": i, **members[i], "objective": scores[i], "copies": copies.get(i)}
                    for i in range(len(members))
                ],
            }
        )
        for loser, winner in copies.items():  # exploit: the winner's checkpoints and values; explore: perturb them
            target = root / f"member_{loser}" / "checkpoints"
            shutil.rmtree(target)
            shutil.copytree(root / f"member_{winner}" / "checkpoints", target)
            members[loser] = explore(members[winner], factors, rng)
        write_report(root, history, lower)
    best = min if lower else max
    final = best(history[-1]["members"], key=lambda m: m["objective"])
    print(f"pbt done: {root}; best member_{final['member']}: {name} {final['objective']:.4g}")
    return 0


def write_report(root: Path, history: list[dict], lower: bool) -> None:
    (root / "pbt.json").write_text(json.dumps(history, indent=2) + "\n")
    keys = [k for k in history[0]["members"][0] if k not in ("member", "objective", "copies")]
    name = history[0]["objective_name"]
    lines = [
        f"# Population-based training: {root}",
        "",
        f"objective: held-out {name} ({'lower' if lower else 'higher'} is better); `copies` = the member whose "
        "checkpoint and hyperparameters it took after this generation (then perturbed)",
        "",
        "| generation | step | member | " + " | ".join(keys) + f" | {name} | copies |",
        "|---" * (5 + len(keys)) + "|",
    ]
    for gen in history:
        for m in gen["members"]:
            copies = "" if m["copies"] is None else f"member_{m['copies']}"
            lines.append(
                f"| {gen['generation']} | {gen['step']} | member_{m['member']} | "
                + " | ".join(f"{m[k]:.4g}" for k in keys)
                + f" | {m['objective']:.4g} | {copies} |"
            )
    (root / "pbt.md").write_text("\n".join(lines) + "\n\n![objective](objective.png)\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i in range(len(history[0]["members"])):
        rows = [json.loads(x) for x in (root / f"member_{i}" / "metrics.jsonl").read_text().splitlines()]
        points = sorted((r["step"], r[f"eval/{name}"]) for r in rows if f"eval/{name}" in r)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"member_{i}")
    for gen in history[:-1]:
        ax.axvline(gen["step"], color="grey", alpha=0.3)
    ax.set_xlabel("step")
    ax.set_ylabel(f"held-out {name}")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(root / "objective.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
