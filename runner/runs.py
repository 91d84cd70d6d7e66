"""Run management: list runs, show one, compare several. Reads run directories only (status.json, overrides.yaml,
summary.json, metrics.jsonl); starts nothing.

    runner ls [DIR]                    # every run under DIR (default outputs/): stage, status, start, steps, objective
    runner show RUN                    # a run's overrides, status and summary
    runner compare RUN RUN [...]       # their differing overrides and metrics side by side, and overlaid curves
    (python -m runner.runs ls|show|compare ... is the same)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

SUMMARY_KEYS = ("steps", "objective_name", "objective", "eval_reward_initial", "eval_reward_final", "eval_reward_gain")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def runs(root: Path) -> list[Path]:
    """Run directories under root (those with a status.json), oldest first."""
    found = {p.parent for p in root.rglob("status.json")}
    return sorted(found, key=lambda p: _json(p / "status.json").get("time", ""))


def row(run: Path) -> dict:
    status, summary = _json(run / "status.json"), _json(run / "summary.json")
    config = run / "config.yaml"
    stage = yaml.safe_load(config.read_text())["step"]["name"] if config.exists() else "?"
    objective = summary.get("objective")
    return {
        "stage": stage,
        "status": status.get("status", "?"),
        "started": status.get("time", ""),
        "steps": summary.get("steps", status.get("step", "")),
        "objective": f"{summary.get('objective_name')} {objective:.4g}" if isinstance(objective, float) else "",
        "reward gain": f"{summary['eval_reward_gain']:+.3f}" if "eval_reward_gain" in summary else "",
        "run": str(run),
    }


def table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    lines = ["  ".join(k.ljust(widths[k]) for k in keys)]
    lines += ["  ".join(str(r[k]).ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def show(run: Path) -> str:
    overrides = yaml.safe_load((run / "overrides.yaml").read_text()) if (run / "overrides.yaml").exists() else []
    status, summary = _json(run / "status.json"), _json(run / "summary.json")
    lines = [f"run: {run}", f"command: python -m runner {' '.join(overrides)}"]
    lines += [f"status: {status.get('status')} ({status.get('time', '')})"]
    if status.get("reason"):
        lines.append(f"reason: {status['reason']}")
    for key in SUMMARY_KEYS:
        if key in summary:
            value = summary[key]
            lines.append(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    for name in ("curves.png", "export"):
        if (run / name).exists():
            lines.append(f"{name}: {run / name}")
    return "\n".join(lines)


def compare(paths: list[Path], out: Path | None) -> str:
    """The overrides that differ, the summary metrics side by side, and (with `out`) overlaid eval curves."""
    given = {
        p: dict(o.split("=", 1) for o in (yaml.safe_load((p / "overrides.yaml").read_text()) or []) if "=" in o)
        for p in paths
    }
    keys = sorted({k for o in given.values() for k in o if len({o.get(k) for o in given.values()}) > 1})
    keys = [k for k in keys if k not in ("run_dir", "resume")]
    summaries = {p: _json(p / "summary.json") for p in paths}
    rows = []
    for p in paths:
        r = {"run": p.name}
        r.update({k: given[p].get(k, "") for k in keys})
        for key in SUMMARY_KEYS[2:]:
            value = summaries[p].get(key)
            r[key] = f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))
        rows.append(r)
    text = table(rows)
    if out is not None:
        _overlay(paths, out)
        text += f"\ncurves: {out}"
    return text


def _overlay(paths: list[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = {p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()] for p in paths}
    keys = [
        k
        for k in ("train/loss", "train/actor_loss", "eval/loss", "eval/accuracy", "eval/reward_mean")
        if any(k in r for rows in metrics.values() for r in rows)
    ]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4.5 * max(len(keys), 1), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for p, rows in metrics.items():
            points = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot([x for x, _ in points], [y for _, y in points], label=p.name)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="runner", description="List, show and compare runs.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list runs").add_argument("dir", nargs="?", default="outputs", type=Path)
    sub.add_parser("show", help="show a run").add_argument("run", type=Path)
    cmp = sub.add_parser("compare", help="compare runs")
    cmp.add_argument("runs", nargs="+", type=Path)
    cmp.add_argument("--out", type=Path, default=Path("compare.png"), help="overlaid curves (PNG)")
    args = parser.parse_args(argv)
    targets = [args.dir] if args.command == "ls" else [args.run] if args.command == "show" else args.runs
    missing = [t for t in targets if not t.is_dir()]
    if missing:
        print(f"error: {missing[0]} is not a directory", file=sys.stderr)
        return 2
    if args.command == "ls":
        found = runs(args.dir)
        print(table([row(r) for r in found]) if found else f"no runs under {args.dir}")
    elif args.command == "show":
        if not (args.run / "status.json").exists():
            print(f"error: {args.run} is not a run directory (no status.json)", file=sys.stderr)
            return 2
        print(show(args.run))
    else:
        print(compare(args.runs, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
