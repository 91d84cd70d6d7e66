"""The report of a sweep: one row per point (status, throughput, memory, final metric, wall time) as Markdown and
CSV, and plots of throughput, memory and the judged reward gain. `metric`/`value` are each run's held-out objective
(e.g. DPO's preference accuracy); `reward_gain` the judged held-out reward's change for methods that train a policy.
The plots' x axis is the micro-batch size when the sweep varies it, else the first numeric key it varies (e.g.
step.rollout.n or step.kl.coef); one line per advantage estimator when the sweep varies it, else per ZeRO stage.
Each plot has a title, labelled axes and a y axis from zero. A point's throughput is the median over its logging
intervals after the first (which holds start-up: compilation, allocator warm-up); one measured over fewer than
MIN_THROUGHPUT_STEPS steps is marked (hollow in the plot, `few steps` in the table): too few to trust.

    python -m runner.report outputs/multirun/<sweep>        # (re)generate it from a sweep directory at any time

Hydra calls it at the end of every multirun (hydra.callbacks.sweep_report in conf/config.yaml). For a planned
sweep (`-m ... dry_run=true`) it writes plan.md: the estimated model-state memory per device of every point.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

COLUMNS = [
    "point",
    "status",
    "zero",
    "micro_batch",
    "world",
    "tokens_per_s",
    "samples_per_s",
    "throughput_steps",
    "peak_mem_mb_per_rank",
    "metric",
    "value",
    "reward_gain",
    "estimator",
    "wall_time_s",
    "reason",
    "overrides",
]


def _override(overrides: list[str], key: str) -> str | None:
    for o in overrides:
        k, _, v = o.lstrip("+~").partition("=")
        if k == key:
            return v
    return None


MIN_THROUGHPUT_STEPS = 20  # fewer measured steps than this: the throughput is marked as too few to trust


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    values = values[1:] if len(values) > 1 else values  # the first interval holds start-up
    return statistics.median(values) if values else None


def _measured_steps(train: list[dict]) -> int:
    """The steps behind a throughput: those logged after the first interval (0 when there is only that one)."""
    return train[-1]["step"] - train[0]["step"] if train else 0


def few_steps(row: dict) -> bool:
    return row.get("tokens_per_s") is not None and (row.get("throughput_steps") or 0) < MIN_THROUGHPUT_STEPS


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for point in sorted(
        (p for p in sweep_dir.iterdir() if (p / "status.json").exists()),
        key=lambda p: (len(p.name.split("_", 1)[0]), p.name),
    ):
        status = json.loads((point / "status.json").read_text())
        overrides = status.get("overrides", [])
        row: dict[str, Any] = {
            "point": point.name,
            "status": status["status"],
            "reason": status.get("reason", ""),
            "wall_time_s": status.get("wall_time_s"),
            "overrides": " ".join(overrides),
        }
        config = point / "ds_config.json"
        if config.exists():
            ds = json.loads(config.read_text())
            row.update(
                zero=ds["zero_optimization"]["stage"],
                micro_batch=ds["train_micro_batch_size_per_gpu"],
                world=ds["train_batch_size"]
                // (ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]),
            )
        else:  # an invalid point: read what it asked for
            zero = _override(overrides, "zero")
            row.update(
                zero=int(zero[5]) if zero and zero.startswith("stage") and zero[5:6].isdigit() else zero,
                micro_batch=_override(overrides, "train.micro_batch_size"),
            )
        if "plan" in status:
            plan = status["plan"]
            row.update(
                zero=plan["zero_stage"],
                micro_batch=plan["micro_batch_size"],
                world=plan["world_size"],
                plan_gb_per_device=plan.get("peak_gb", round(plan["memory"]["per_device_gb"], 3)),
                states_gb_per_device=round(plan["memory"]["per_device_gb"], 3),
                verdict=plan.get("verdict"),
                est_tokens_per_s=plan.get("tokens_per_s"),
                suggestion=" ".join((plan.get("suggestion") or {}).get("overrides", [])),
            )
        metrics_file = point / "metrics.jsonl"
        if metrics_file.exists():
            records = [json.loads(x) for x in metrics_file.read_text().splitlines()]
            train = [r for r in records if "train/tokens_per_s" in r]  # (every method's training rows)
            row["tokens_per_s"] = _median(train, "train/tokens_per_s")
            row["samples_per_s"] = _median(train, "train/samples_per_s")
            row["throughput_steps"] = _measured_steps(train)
            peaks = [max(r["train/peak_memory_mb"]) for r in train if r.get("train/peak_memory_mb")]
            row["peak_mem_mb_per_rank"] = max(peaks) if peaks else None
        summary = point / "summary.json"
        if summary.exists():
            s = json.loads(summary.read_text())
            row["metric"], row["value"] = s.get("objective_name"), s.get("objective")
            row["reward_gain"] = s.get("eval_reward_gain")  # a policy's held-out reward, after minus before
            row["estimator"] = s.get("advantage")  # online RL's advantage estimator (ppo: gae)
        rows.append(row)
    return rows


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _cell(row: dict, column: str) -> str:
    text = _fmt(row.get(column))
    return f"{text} (few steps)" if column == "tokens_per_s" and few_steps(row) else text


def few_steps_line(rows: list[dict]) -> str:
    few = [r["point"] for r in rows if few_steps(r)]
    if not few:
        return ""
    return (
        f"throughput of point {', '.join(few)} is measured over fewer than {MIN_THROUGHPUT_STEPS} steps after the "
        "first logging interval (which holds start-up): too few to trust; train longer (train.max_steps) to "
        "compare throughput\n\n"
    )


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def axes(rows: list[dict]) -> tuple[str, str, str]:
    """(x key, x label, series key) for the plots: the micro-batch size if the sweep varies it, else the first
    override key with numeric values that differ between points; lines per estimator if it varies, else per ZeRO."""
    if len({r.get("micro_batch") for r in rows}) > 1 or not rows:
        x = ("micro_batch", "micro-batch size per device")
    else:
        values: dict[str, set] = {}
        for r in rows:
            for o in r["overrides"].split():
                k, _, v = o.lstrip("+~").partition("=")
                if _number(v) is not None:
                    values.setdefault(k, set()).add(v)
        varied = [k for k, v in values.items() if len(v) > 1]
        x = (f"override:{varied[0]}", varied[0]) if varied else ("micro_batch", "micro-batch size per device")
    series = "estimator" if len({r.get("estimator") for r in rows} - {None}) > 1 else "zero"
    return x[0], x[1], series


def _x(row: dict, key: str) -> float | None:
    if key.startswith("override:"):
        return _number(_override(row["overrides"].split(), key.split(":", 1)[1]))
    return _number(row.get(key))


PLOTS = (  # (row key, y label, file, title)
    ("tokens_per_s", "tokens / s (median over logged intervals)", "throughput.png", "Training throughput"),
    ("peak_mem_mb_per_rank", "peak memory per rank (MiB)", "memory.png", "Peak memory per rank"),
    ("reward_gain", "held-out reward gain (judged)", "reward_gain.png", "Held-out reward: after minus before"),
)


def figure(rows: list[dict], key: str, ylabel: str, title: str):
    """One plot of `key` against the sweep's x axis (None when no point has both): a line per series, a title,
    labelled axes, y from zero (and the x axis too when it is linear); a throughput from too few steps is hollow."""
    from matplotlib.figure import Figure  # (no pyplot: nothing global to close)
    from matplotlib.ticker import ScalarFormatter

    x_key, x_label, series = axes(rows)
    lines: dict[Any, list[tuple[float, float, bool]]] = {}
    for r in rows:
        x, y = _x(r, x_key), r.get(key)
        if x is not None and isinstance(y, (int, float)):
            lines.setdefault(r.get(series), []).append((x, y, key == "tokens_per_s" and few_steps(r)))
    if not lines:
        return None
    fig = Figure(figsize=(6, 4.4))
    ax = fig.subplots()
    for name, points in sorted(lines.items(), key=lambda kv: str(kv[0])):
        points.sort()
        label = f"ZeRO-{name}" if series == "zero" else str(name)
        line = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)[0]
        few = [p for p in points if p[2]]
        if few:  # hollow: too few steps to trust
            ax.plot([p[0] for p in few], [p[1] for p in few], "o", mfc="white", mec=line.get_color(), zorder=3)
    xs = {p[0] for points in lines.values() for p in points}
    if x_key == "micro_batch" or (min(xs) > 0 and max(xs) / min(xs) >= 8):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(xs))
        ax.xaxis.set_major_formatter(ScalarFormatter())  # 1, 2, 4 (not 2^0, 2^1, 2^2)
    elif min(xs) >= 0:
        ax.set_xlim(left=0, right=max(xs) * 1.05 or 1)
    ys = [p[1] for points in lines.values() for p in points]
    low, high = min(0.0, min(ys)), max(0.0, max(ys))
    pad = (high - low) * 0.08 or 1.0
    ax.set_ylim(low - (pad if low < 0 else 0), high + pad)  # from zero (below it when a value is negative)
    if low < 0:
        ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_title(title)
    ax.set_xlabel(x_label)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(title="advantage estimator" if series == "estimator" else None)
    if any(p[2] for points in lines.values() for p in points):
        note = f"hollow: measured over fewer than {MIN_THROUGHPUT_STEPS} steps, too few to trust"
        fig.text(0.01, 0.01, note, fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def write(sweep_dir: Path) -> Path | None:
    """Write report.md, report.csv and the plots (or plan.md for a planned sweep) into the sweep directory."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if not rows:
        return None
    if all(r["status"] == "planned" for r in rows):
        from runner.driver.show import sweep_plan_md

        lines = sweep_plan_md(rows, _fmt)
        out = sweep_dir / "plan.md"
        out.write_text("\n".join(lines) + "\n")
        return out
    with open(sweep_dir / "report.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
    body = "\n".join(
        "| " + " | ".join(_cell(r, c).replace("|", "\\|").replace("\n", " ") for c in COLUMNS) + " |" for r in rows
    )
    counts = {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})}
    plots = []
    for key, label, name, title in PLOTS:
        if (fig := figure(rows, key, label, title)) is not None:
            fig.savefig(sweep_dir / name, dpi=100)
            plots.append(name)
    text = (
        f"# Sweep report: {sweep_dir}\n\n"
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + "\n\n"
        + best_line(rows)
        + few_steps_line(rows)
        + head
        + "\n"
        + body
        + "\n\n"
        + "".join(f"![{p}]({p})\n" for p in plots)
    )
    (sweep_dir / "report.md").write_text(text)
    return sweep_dir / "report.md"


LOWER_IS_BETTER = ("loss", "perplexity")


def best_line(rows: list[dict]) -> str:
    """The best completed point by its held-out objective (lower for losses, higher otherwise), and the best
    judged reward gain when points have one."""
    done = [r for r in rows if r["status"] == "completed" and isinstance(r.get("value"), (int, float))]
    lines = []
    if done and len({r["metric"] for r in done}) == 1:
        metric = done[0]["metric"]
        pick = min if any(w in str(metric) for w in LOWER_IS_BETTER) else max
        best = pick(done, key=lambda r: r["value"])
        lines.append(f"best {metric}: {best['value']:.4g} at point {best['point']} (`{best['overrides']}`)")
    gains = [r for r in done if isinstance(r.get("reward_gain"), (int, float))]
    if gains:
        best = max(gains, key=lambda r: r["reward_gain"])
        lines.append(f"best held-out reward gain: {best['reward_gain']:+.4g} at point {best['point']}")
    return "".join(f"{line}\n\n" for line in lines)


class SweepReport(Callback):
    """Hydra callback: write the report when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        """Write the report; then, if any point failed or was invalid, exit non-zero (every point has run)."""
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            out = write(sweep_dir)
        except OSError as exc:  # a full disk: the table still reaches the console
            out = None
            print(f"error: could not write the sweep report into {sweep_dir} ({exc.strerror})", file=sys.stderr)
        if out:
            print(f"sweep report: {out}")
        rows = collect(sweep_dir) if sweep_dir.is_dir() else []
        bad = [r for r in rows if r["status"] in ("failed", "invalid", "aborted")]
        if bad:
            print(
                f"error: {len(bad)} of {len(rows)} sweep points did not complete: "
                + ", ".join(f"{r['point']} ({r['status']})" for r in bad),
                file=sys.stderr,
            )
            sys.exit(1)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m runner.report SWEEP_DIR", file=sys.stderr)
        return 2
    out = write(Path(argv[0]))
    print(out or f"no sweep points (status.json) under {argv[0]}")
    return 0 if out else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
