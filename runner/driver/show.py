"""What the driver prints and writes for a plan: a short summary on the console (does it fit, the biggest terms,
the estimated step time, the launcher command) and the whole plan in plan.md beside the recipe and JSONs."""

from __future__ import annotations

from omegaconf import DictConfig


def command(cmd: list[str], env: dict) -> str:
    return (
        " ".join(f"{k}={v}" for k, v in sorted(env.items()))
        + " "
        + " ".join(s if s and " " not in s else repr(s) for s in cmd)
    )


def headline(cfg: DictConfig, world: int, fit: dict) -> str:
    hw, model = fit["hardware"], cfg.model
    size = fit.get("num_params") or fit["model_states"]["num_params"]
    par = fit.get("parallel") or {}
    data = cfg.get("parallel", {}).get("data") or world
    layout = "".join(f", {k} parallel {v}" for k, v in par.items() if v > 1)
    return (
        f"plan: {cfg.step.name} of {model.get('name') or model.path} ({_count(size)} parameters) on {world} x "
        f"{hw['name']} ({hw['device']}), ZeRO-{cfg.zero.stage}{layout}, {cfg.precision.dtype}, global batch "
        f"{cfg.train.micro_batch_size} x {cfg.train.gradient_accumulation_steps} x {data}"
    )


def verdict_lines(fit: dict) -> list[str]:
    v = fit["verdict"]
    head = {"fits": "fits", "tight": "TIGHT", "does not fit": "DOES NOT FIT"}[v]
    lines = [
        f"memory per device: {gib(fit['peak_gb'])} at its peak of {gib(fit['capacity_gb'])}: {head}"
        + (f" ({fit['headroom']:.0%} headroom)" if v != "does not fit" else ""),
        "  biggest: " + " · ".join(f"{k} {gib(fit['terms_gb'][k])}" for k in fit["biggest"]),
    ]
    if fit["host_gb"]:
        lines.append(f"  CPU memory per node: {gib(fit['host_gb'])} of {gib(fit['host_capacity_gb'] or 0)}")
    s = fit.get("suggestion")
    if v != "fits":
        lines.append(
            f"  cheapest change that fits: {' '.join(s['overrides'])} -> {gib(s['peak_gb'])} per device "
            f"({s['headroom']:.0%} headroom)"
            if s
            else "  no single change of ZeRO stage, checkpointing, micro-batch or offload makes it fit: more devices"
        )
    return lines


def time_line(fit: dict) -> str:
    t = fit.get("time") or {}
    if not t.get("step_s"):
        return f"time: no estimate ({t.get('why', 'unknown')})"
    run = f"; {t['run_s'] / t['step_s']:.0f} steps ≈ {_duration(t['run_s'])}" if t.get("run_s") else ""
    return (
        f"time (an estimate: {t['assumption']}): {_duration(t['step_s'])} per step, "
        f"{t['tokens_per_s']:,.0f} tokens/s{run}"
    )


def plan(cfg, cmd: list[str], env: dict, fit: dict, notes: list[str], run_dir) -> None:
    """The dry run's console: a summary; the rest is in run_dir (plan.md, config.yaml, ds_config*.json)."""
    print(headline(cfg, int(cfg.runtime.world_size), fit))
    for line in verdict_lines(fit) + [time_line(fit)]:
        print(line)
    print(f"launch: {command(cmd, env)}")
    print(f"plan files: {run_dir}/ (plan.md: the whole breakdown; config.yaml; ds_config*.json; launch.sh)")
    for note in notes:
        print(f"note: {note}")


def plan_md(cfg, configs: dict, cmd: list[str], env: dict, fit: dict, notes: list[str]) -> str:
    """plan.md: everything the plan knows, for a person."""
    hw, states = fit["hardware"], fit["model_states"]
    out = [f"# {headline(cfg, int(cfg.runtime.world_size), fit)}", ""]
    out += [line.strip() if not line.startswith("  ") else f"- {line.strip()}" for line in verdict_lines(fit)]
    out += ["", "## Memory per device at the peak", "", "| term | GiB |", "|---|---|"]
    out += [f"| {k} | {v:,.3f} |" for k, v in fit["terms_gb"].items()]
    out += [f"| **total** | **{fit['peak_gb']:,.3f}** |", ""]
    out += [f"Model states counted by: {states['source']}.", "", "| engine | trained | parameters | GiB per device |"]
    out += ["|---|---|---|---|"]
    out += [
        f"| {name or 'the trained model'} | {'yes' if e['trained'] else 'no (frozen)'} | {e['num_params']:,} | "
        f"{e['per_device_gb']:,.3f} |"
        for name, e in states["engines"].items()
    ]
    out += [
        "",
        f"Hardware: {hw['name']} ({hw['device']}), {hw['device_memory_gb']} GiB per device, "
        f"{hw['peak_tflops']} peak TFLOP/s, assumed utilisation {hw['mfu']}.",
        "",
        "## Time",
        "",
        time_line(fit),
        "",
        "## Launcher command",
        "",
        "```",
        command(cmd, env),
        "```",
    ]
    out += ["", "## Notes", ""] + [f"- {n}" for n in notes] if notes else []
    out += ["", "The DeepSpeed JSONs: " + ", ".join(f"ds_config{'.' + n if n else ''}.json" for n in configs)]
    return "\n".join(out) + "\n"


def sweep_plan_md(rows: list[dict], fmt) -> list[str]:
    """The lines of a planned sweep's plan.md: one row per point (runner.report.collect's rows)."""
    lines = [
        "# Sweep plan: peak memory per device, verdict and estimated throughput of every point",
        "",
        "Peak = runtime overhead + every engine's model states + the largest activations of a step (each point's",
        "plan.md has the breakdown); tokens/s is an estimate from FLOPs at the hardware's assumed utilisation.",
        "",
        "| point | ZeRO | micro-batch | world | peak GiB per device | model states GiB | verdict | est. tokens/s "
        "| would fit with | overrides |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    return lines + [
        f"| {r['point']} | {r['zero']} | {r['micro_batch']} | {r['world']} | {r['plan_gb_per_device']:.3f} | "
        f"{r.get('states_gb_per_device', '')} | {r.get('verdict') or ''} | "
        f"{fmt(round(r['est_tokens_per_s'])) if r.get('est_tokens_per_s') else ''} | "
        f"{('`' + r['suggestion'] + '`') if r.get('suggestion') else ''} | `{r['overrides']}` |"
        for r in rows
    ]


def gib(value: float) -> str:
    """A size given in GiB, in GiB, or in MiB when under one."""
    return "0 GiB" if value == 0 else f"{value:,.1f} GiB" if value >= 1 else f"{value * 1024:,.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.1f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
