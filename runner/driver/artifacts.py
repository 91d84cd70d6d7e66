"""What a finished run leaves for people: `curves.png` (its metrics over steps, one titled panel each) and, beside
its exported model, a model card (`export/README.md`: base model, method, data, key settings, held-out results and
the command that made it). Written by the driver from the run directory; the runner's machine-readable export
record (`runner_export.json`) stays as it is."""

from __future__ import annotations

import json
import shlex
import threading
import time
from pathlib import Path

import yaml

# (metric, panel title), in the order they are drawn; a run draws the ones it logged
PANELS = [
    ("train/loss", "training loss"),
    ("train/actor_loss", "policy loss"),
    ("eval/loss", "held-out loss"),
    ("eval/accuracy", "held-out accuracy"),
    ("eval/reward_mean", "held-out reward (judged)"),
    ("eval/pass_rate", "held-out pass rate"),
    ("train/reward_mean", "training reward"),
    ("train/kl", "KL to the reference"),
    ("train/entropy", "entropy"),
    ("train/response_length", "answer length (tokens)"),
    ("train/margin", "preference margin"),
    ("train/zero_variance_groups", "groups with equal scores (share)"),
    ("train/acceptance_rate", "kept answers (share)"),
    ("train/lr", "learning rate"),
    ("adapt/lr_scale", "train.adapt: learning-rate scale"),
    ("train/tokens_per_s", "tokens / s"),
]
TIMES = ("train/gen_time_s", "train/experience_time_s", "train/train_time_s")


def load_yaml(path: Path):
    """A file the driver wrote, parsed by libyaml (PyYAML's C loader: ~10x faster than its Python one)."""
    return yaml.load(path.read_text(), Loader=yaml.CSafeLoader)


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display), imported once: ~1 s the first time, which the
    driver spends while the ranks train (`warm_up`), not after they exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class EarlyCurves:
    """curves.png drawn while the launcher winds down. Started when the ranks are launched, a background thread
    imports pyplot and loads the font (~1 s, while the launcher and the ranks start), then waits for this attempt's
    summary.json (rank 0 writes it after its last metrics.jsonl line) and draws the curves then: meanwhile the ranks
    leave the process group and DeepSpeed's launcher notices that they exited (it polls once a second). `result()`
    waits for that drawing, or draws now when the thread did not (no summary: a run that failed or stopped; an
    error, raised here)."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.since = run_dir, time.time()
        self.done, self.stop, self.drawn, self.error = False, threading.Event(), None, None
        self.thread = threading.Thread(target=self._work, name="curves", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        try:  # at once, while DeepSpeed's launcher starts (not during the training, whose tokens/s it would slow)
            from matplotlib.backends.backend_agg import FigureCanvasAgg

            fig = pyplot().figure(figsize=(1, 1))
            fig.text(0.5, 0.5, "0.1 step")
            FigureCanvasAgg(fig).draw()  # the font's first use: its file is read and cached
            pyplot().close(fig)
            summary = self.run_dir / "summary.json"
            while not self.stop.wait(0.05):
                if summary.exists() and summary.stat().st_mtime >= self.since:
                    self.drawn = curves(self.run_dir)
                    self.done = True
                    return
        except Exception as exc:  # handed to the caller by result()
            self.error = exc

    def result(self) -> Path | None:
        self.stop.set()
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.drawn if self.done else curves(self.run_dir)


def curves(run_dir: Path) -> Path | None:
    """curves.png from metrics.jsonl (None when the run logged nothing)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    panels = [(k, t) for k, t in PANELS if series(rows, k)[0]]
    timed = [k for k in TIMES if series(rows, k)[0]]
    if not panels:
        return None
    plt = pyplot()
    n = len(panels) + bool(timed)
    cols = min(3, n)
    rows_n = (n + cols - 1) // cols
    width, height = 4.2 * cols, 3.0 * rows_n
    fig, axes = plt.subplots(rows_n, cols, figsize=(width, height))
    # fixed margins (inches) instead of tight_layout, which renders every label an extra time to measure it: 2-3x the
    # drawing's cost for the same picture
    fig.subplots_adjust(
        left=0.75 / width, right=1 - 0.2 / width, bottom=0.5 / height, top=1 - 0.6 / height, wspace=0.3, hspace=0.45
    )
    axes = list(getattr(axes, "flat", [axes]))
    for ax, (key, title) in zip(axes, panels):
        x, y = series(rows, key)
        ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(key.split("/", 1)[1])
        if key == "train/lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(True, alpha=0.3)
    if timed:  # where a step's time goes: generation, experience, training
        ax = axes[len(panels)]
        for key in timed:
            ax.plot(*series(rows, key), label=key.split("/", 1)[1].removesuffix("_time_s"))
        ax.set_title("time per step (s)")
        ax.set_xlabel("step")
        ax.set_ylabel("seconds")
        ax.set_ylim(bottom=0)
        ax.legend()
        ax.grid(True, alpha=0.3)
    for ax in axes[n:]:
        ax.axis("off")
    config = run_dir / "config.yaml"
    stage = load_yaml(config)["step"]["name"] if config.exists() else ""
    fig.suptitle(f"{stage} run {run_dir.name}", fontsize=10)
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def model_card(run_dir: Path, summary: dict) -> Path | None:
    """export/README.md for a run that exported a model."""
    export = Path(summary.get("export_dir") or run_dir / "export")
    if not (export / "config.json").exists():
        return None
    cfg = load_yaml(run_dir / "config.yaml")
    overrides = load_yaml(run_dir / "overrides.yaml") or []
    step, train, model, data = cfg["step"], cfg["train"], cfg["model"], cfg["data"]
    start = step.get("init_from") or step.get("actor_from") or model.get("path")
    start = start or f"{model.get('name')} (built from its architecture)"
    record = export / "runner_export.json"
    kind = json.loads(record.read_text()).get("kind") if record.exists() else None
    own = {k: v for k, v in step.items() if isinstance(v, (int, float, str)) and k not in ("name",) and v is not None}
    lines = [
        f"# {model.get('name') or 'model'}, trained with {step['name']} by runner",
        "",
        f"- **Method:** `{step['name']}`" + (f" ({kind})" if kind else ""),
        f"- **Started from:** `{start}`",
        "- **Data:** "
        + ", ".join(f"`{name}` ({s.get('path')})" for name, s in data["sets"].items())
        + f"; `data.split` {data.get('split')}",
        f"- **Training:** {summary.get('steps')} steps on {cfg['runtime']['world_size']} rank(s), ZeRO stage "
        f"{cfg['zero']['stage']}, {cfg['precision']['dtype']}, learning rate {cfg['optimizer']['lr']}, micro-batch "
        f"{train['micro_batch_size']} x accumulation {train['gradient_accumulation_steps']}",
        "- **Method settings:** " + ", ".join(f"`{k}={v}`" for k, v in sorted(own.items())),
        "",
        "## Held-out results",
        "",
    ]
    if isinstance(summary.get("objective"), (int, float)):
        lines.append(f"- {summary['objective_name']}: {summary['objective']:.4g}")
    if isinstance(summary.get("eval_reward_gain"), (int, float)):
        lines.append(
            f"- reward ({summary.get('eval_judge')}): {summary['eval_reward_initial']:.4g} before training, "
            f"{summary['eval_reward_final']:.4g} after ({summary['eval_reward_gain']:+.4g})"
        )
    lines += [
        "",
        "## Made by",
        "",
        "```bash",
        "python -m runner " + " ".join(shlex.quote(o) for o in overrides),
        "```",
        "",
        "Load it with `transformers`: `AutoModelForCausalLM.from_pretrained(...)` for a causal LM, "
        "`AutoModelForSequenceClassification.from_pretrained(...)` for a reward model. Training record: "
        "`runner_export.json` beside this file; metrics and curves in the run directory.",
    ]
    out = export / "README.md"
    out.write_text("\n".join(lines) + "\n")
    return out
