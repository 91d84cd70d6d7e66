"""The runner picks the fastest configuration that fits: `python -m runner autotune=true ...`.

1. candidates: ZeRO option x micro-batch at the user's global batch (gradient accumulation makes up the rest); for
   PPO the actor's and the critic's ZeRO options together (and step.generation_batch_size when tune lists several);
2. the plan of each (runner.driver.fit): a candidate that does not fit gets gradient checkpointing, then (with
   tune.offload) the offload options, and is dropped only when nothing fits;
3. a short timed trial of each that fits: a real run of tune.steps steps in its own directory under tune.dir
   (`python -m runner ... run_dir=tune.dir/NN`), so that a failing candidate is recorded and the search goes on, and
   a search started again skips the trials that finished;
4. the winner: the highest median training tokens/s. autotune.md (a table) and autotune.png (tokens/s vs peak
   memory) are written, with recipe/autotuned.yaml, and the command that runs it is printed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from runner.overrides import key as key_of
from runner.paths import local

DROP = ("autotune", "tune.", "run_dir", "dry_run", "resume", "hydra.")
TRIAL = ["train.eval_every=0", "train.eval_max_batches=1", "train.export=false", "train.log_every=1"]


def check(cfg: DictConfig) -> None:
    """The search's keys, before anything runs."""
    from runner.driver import checks
    from runner.errors import ConfigError

    checks.positive_int(cfg, "tune.steps")
    zero_dir = Path(__file__).resolve().parent.parent.parent / "conf" / "zero"
    for option in cfg.tune.zero:
        if not (zero_dir / f"{option}.yaml").is_file():
            known = ", ".join(sorted(p.stem for p in zero_dir.glob("*.yaml")))
            raise ConfigError("tune.zero", f"unknown ZeRO option {option!r}", f"use some of {known}")
    micros = cfg.tune.micro_batch_sizes
    if micros != "auto" and not (isinstance(list(micros), list) and all(isinstance(m, int) and m > 0 for m in micros)):
        raise ConfigError("tune.micro_batch_sizes", f"must be auto or a list of positive integers, got {micros}")
    if cfg.tune.generation_batch_sizes and cfg.step.name != "ppo":
        raise ConfigError("tune.generation_batch_sizes", f"applies to step=ppo only, not step={cfg.step.name}")


def candidates(cfg: DictConfig) -> list[list[str]]:
    """Override lists to try (before the plan filters them). A data set's batches: the user's batch per rank
    (micro-batch x accumulation) split into every micro-batch that divides it. An on-policy method's: micro-batches
    that divide a step's answers per rank, with the accumulation that keeps the user's optimizer batch (at most the
    step's answers) and never straddles two steps (runner.driver.checks.chunks)."""
    from runner import stages

    tune, train = cfg.tune, cfg.train
    method = stages.get(str(cfg.step.name))
    zero_keys = ["zero@step.actor.zero", "zero@step.critic.zero"] if cfg.step.name == "ppo" else ["zero"]
    global_batch = int(train.micro_batch_size) * int(train.gradient_accumulation_steps)  # per rank
    gens = list(tune.generation_batch_sizes or [None]) if cfg.step.name == "ppo" else [None]
    out = []
    for option in tune.zero:
        for gen in gens:
            rollout = cfg.copy()
            if gen:
                rollout.step.generation_batch_size = gen
            answers, epochs_key = method.rollout_answers(rollout) or (None, None)
            whole = answers or global_batch
            micros = tune.micro_batch_sizes
            if micros == "auto":
                micros = [m for m in (1, 2, 4, 8, 16, 32, 64) if whole % m == 0 and m <= whole]
            for micro in micros:
                gas = max(1, min(global_batch, whole) // micro)
                if answers:
                    chunks = answers // micro * int(OmegaConf.select(cfg, epochs_key))
                    gas = max(g for g in range(1, gas + 1) if chunks % g == 0) if chunks else 1
                trial = [f"{k}={option}" for k in zero_keys]
                trial += [f"train.micro_batch_size={micro}", f"train.gradient_accumulation_steps={gas}"]
                if gen:
                    trial.append(f"step.generation_batch_size={gen}")
                out.append(trial)
    return out


def fallbacks(cfg: DictConfig) -> list[list[str]]:
    """What a candidate that does not fit may add, cheapest first."""
    keys = ["train.gradient_checkpointing=true"]
    if cfg.step.name == "ppo":
        keys += ["step.actor.gradient_checkpointing=true", "step.critic.gradient_checkpointing=true"]
    out = [keys]
    if cfg.tune.offload:
        zero_keys = ["zero@step.actor.zero", "zero@step.critic.zero"] if cfg.step.name == "ppo" else ["zero"]
        out += [[f"{k}={o}" for k in zero_keys] for o in ("stage2_offload", "stage3_offload")]
    return out


def search(cfg: DictConfig, base: list[str], plan_of, trial) -> dict:
    """Plan every candidate, run the ones that fit, pick the fastest. `plan_of(overrides) -> fit dict or an error
    string`; `trial(overrides, run_dir) -> (status, tokens/s, peak MiB, reason)`, or None to plan only."""
    root = local(str(cfg.tune.dir)).resolve()
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, cand in enumerate(candidates(cfg)):
        row = {"point": f"{i:02d}", "overrides": cand, "status": "planned"}
        for extra in [[]] + fallbacks(cfg):
            got = plan_of(base + cand + extra)
            if isinstance(got, str):
                row.update(status="invalid", reason=got)
                break
            row.update(plan_gb=got["peak_gb"], verdict=got["verdict"], est_tokens_per_s=got["time"].get("tokens_per_s"))
            if got["verdict"] != "does not fit":
                row["overrides"] = cand + extra
                break
        else:
            row.update(status="does not fit", reason="no fallback fits (tune.offload=true adds offload)")
        rows.append(row)
    for row in rows if trial else []:
        if row["status"] != "planned":
            continue
        run_dir = root / row["point"]
        done = _finished(run_dir)
        if done is None:
            shutil.rmtree(run_dir, ignore_errors=True)
            done = trial(base + row["overrides"] + TRIAL + [f"train.max_steps={int(cfg.tune.steps)}"], run_dir)
        row.update(zip(("status", "tokens_per_s", "peak_mb", "reason"), done))
    ok = [r for r in rows if r["status"] == "completed" and r.get("tokens_per_s")]
    best = max(ok, key=lambda r: r["tokens_per_s"]) if ok else None
    return {"root": root, "rows": rows, "best": best}


def _finished(run_dir: Path):
    """(status, tokens/s, peak MiB, reason) of a trial that ended (completed or failed) in an earlier search."""
    path = run_dir / "status.json"
    if not path.exists():
        return None
    status = json.loads(path.read_text())
    if status.get("status") not in ("completed", "failed", "invalid"):
        return None
    return (status["status"], *measured(run_dir), status.get("reason", ""))


def measured(run_dir: Path) -> tuple[float | None, float | None]:
    """Median training tokens/s after the first interval, and the largest peak memory of any rank (MiB)."""
    import statistics

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None, None
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    train = [r for r in rows if isinstance(r.get("train/tokens_per_s"), (int, float))]
    tps = [r["train/tokens_per_s"] for r in train][1:] or [r["train/tokens_per_s"] for r in train]
    peaks = [max(r["train/peak_memory_mb"]) for r in train if r.get("train/peak_memory_mb")]
    return (statistics.median(tps) if tps else None), (max(peaks) if peaks else None)


def subprocess_trial(cwd: str):
    def trial(overrides: list[str], run_dir: Path):
        cmd = [sys.executable, "-m", "runner", *overrides, f"run_dir={run_dir}"]
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        tps, peak = measured(run_dir)
        if proc.returncode:
            run_dir.mkdir(parents=True, exist_ok=True)
            reason = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1][:300]
            if not (run_dir / "status.json").exists():
                (run_dir / "status.json").write_text(json.dumps({"status": "failed", "reason": reason}) + "\n")
            return "failed", tps, peak, reason
        return "completed", tps, peak, ""

    return trial


def recipe(base: list[str], winner: list[str]) -> str:
    """The winning overrides as an experiment file (`# @package _global_`): group choices in its defaults list,
    keys as YAML."""
    groups, keys = [], {}
    for o in base + winner:
        k, _, v = o.lstrip("+").partition("=")
        if k.startswith(DROP) or k == "autotune":
            continue
        if "." not in k or "@" in k:
            name, _, pkg = k.partition("@")
            groups.append(f"  - override /{name}{'@' + pkg if pkg else ''}: {v}")
            continue
        node = keys
        *path, last = k.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = _value(o)
    text = "# @package _global_\n"
    if groups:
        text += "defaults:\n" + "\n".join(dict.fromkeys(groups)) + "\n"
    return text + (yaml.safe_dump(keys, sort_keys=False) if keys else "")


def _value(override: str):
    """The Python value of a `key=value` override, by Hydra's own grammar ({a:1}, [1,2], null, quoted strings)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    value = OverridesParser.create().parse_overrides([override])[0].value()
    return _plain(value)


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def write(result: dict, base: list[str], cfg: DictConfig) -> tuple[Path, str | None]:
    """autotune.md, autotune.png and (with a winner) recipe/autotuned.yaml; the command that runs the winner."""
    root, rows, best = result["root"], result["rows"], result["best"]
    lines = [
        f"# Autotune: {cfg.step.name}, {len(rows)} candidates, {int(cfg.tune.steps)} timed steps each",
        "",
        "| point | overrides | plan peak GiB | verdict | est. tokens/s | status | tokens/s | peak MiB per rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = " **(best)**" if r is best else ""
        est = f"{r['est_tokens_per_s']:,.0f}" if r.get("est_tokens_per_s") else ""
        lines.append(
            f"| {r['point']}{mark} | `{' '.join(r['overrides'])}` | {r.get('plan_gb', '')} | {r.get('verdict', '')} | "
            f"{est} | {r['status']}{(': ' + _cell(r['reason'])) if r.get('reason') else ''} | "
            f"{_num(r.get('tokens_per_s'))} | {_num(r.get('peak_mb'))} |"
        )
    command = None
    if best:
        (root / "recipe").mkdir(exist_ok=True)
        (root / "recipe" / "autotuned.yaml").write_text(
            recipe(base, best["overrides"]).replace(
                "# @package _global_\n",
                "# @package _global_\n"
                f"# The fastest of {len(rows)} candidates ({best['tokens_per_s']:,.0f} tokens/s), found by autotune.\n"
                f"#   python -m runner --config-dir {root} recipe=autotuned\n",
            )
        )
        command = f"python -m runner --config-dir {root} recipe=autotuned"
        lines += ["", f"Best: point {best['point']}, `{' '.join(best['overrides'])}`. Run it:", "", f"    {command}"]
    elif any(r["status"] == "planned" for r in rows):
        lines += ["", "Planned only (dry_run=true): autotune=true without it runs a trial of each candidate that fits."]
    else:
        lines += ["", "No candidate completed its trial: see each point's launch.log."]
    (root / "autotune.md").write_text("\n".join(lines) + "\n")
    _plot(rows, best, root / "autotune.png")
    return root / "autotune.md", command


def _cell(text: str) -> str:
    """A message on one table row: its lines joined, without the "error: " prefix."""
    return " ".join(line.strip() for line in str(text).splitlines()).removeprefix("error: ").replace("|", "/")


def _num(value) -> str:
    return f"{value:,.0f}" if isinstance(value, (int, float)) else ""


def _plot(rows: list[dict], best, path: Path) -> None:
    done = [r for r in rows if r.get("tokens_per_s") and r.get("peak_mb")]
    if not done:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([r["peak_mb"] for r in done], [r["tokens_per_s"] for r in done], color="tab:blue")
    for r in done:
        label = " ".join(o.split("=", 1)[1] for o in r["overrides"][:2] if "=" in o)
        ax.annotate(label, (r["peak_mb"], r["tokens_per_s"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if best in done:
        ax.scatter(
            [best["peak_mb"]], [best["tokens_per_s"]], s=160, facecolors="none", edgecolors="tab:red", label="best"
        )
        ax.legend()
    ax.set_xlabel("measured peak memory per rank (MiB)")
    ax.set_ylabel("training tokens / s (median)")
    ax.set_title("Autotune: throughput vs memory of every candidate that ran")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def base_overrides(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not key_of(o).startswith(DROP) and key_of(o) != "autotune"]
