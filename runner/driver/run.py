"""A composed config -> a run: plan, prepare data, write the run directory, launch the ranks, record the outcome.

The Hydra process is the only one that parses the command line. Every check runs before a single file of the run
directory is written, so bad input leaves nothing behind; the directory is claimed for this run alone (runner.driver
.rundir); a stop request (Ctrl-C, SIGTERM) leaves a checkpoint and a status that says `preempted` (exit code 75, a
code a scheduler can requeue on).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from runner import shm
from runner.driver import (
    artifacts,
    keys,
    launch,
    outcome as outcome_,
    pipeline,
    plan as planning,
    resume as resuming,
    rundir,
    show,
    slurm,
    supervise,
)
from runner.driver.job import Finished, Launch, move, plan_fit, prepare
from runner.driver.verdict import verdict
from runner.errors import ConfigError
from runner.overrides import key as key_of, merge, redact

_hydra_dir: Path | None = None  # the directory Hydra created for this job (removed again if left empty)


def discard_empty_run_dir() -> None:
    rundir.discard_if_empty(_hydra_dir)


def _task_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task)


def is_multirun() -> bool:
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN  # (runner.api: no Hydra job)


def _scrub_sweep_file(secret_values: list[str]) -> None:
    """Hydra writes the sweep's overrides to multirun.yaml before any job runs: take secrets out of it."""
    if not secret_values or not is_multirun():
        return
    path = Path(HydraConfig.get().sweep.dir) / "multirun.yaml"
    if path.exists():
        text = path.read_text()
        for value in secret_values:
            text = text.replace(value, "<redacted>")
        path.write_text(text)


def _resume_config(cfg: DictConfig, current: list[str]) -> tuple[DictConfig, list[str]]:
    """Recompose a run's config from the overrides it was started with, plus the new ones given now."""
    from hydra import compose

    run_dir = Path(os.path.expanduser(str(cfg.resume))).resolve()
    saved = run_dir / "overrides.yaml"
    if not saved.is_file():
        raise ConfigError(
            "resume",
            f"{run_dir} is not a run directory (it has no overrides.yaml)",
            "pass the directory a previous `python -m runner` printed as its run directory",
        )
    old = yaml.safe_load(saved.read_text()) or []
    new = [o for o in current if key_of(o) not in ("resume", "run_dir")]
    if any("<redacted>" in o for o in old):
        raise ConfigError(
            "resume",
            "the run was started with a secret on the command line (it was not saved)",
            "put the secret in the environment (e.g. WANDB_API_KEY) and resume again",
        )
    kept = merge(old, new)  # a new value for a key replaces the saved one
    return compose(config_name="config", overrides=kept + [f"run_dir={run_dir}", f"resume={run_dir}"]), kept


def run(cfg: DictConfig) -> float | None:
    """The Hydra task: one run, a sweep point, a SLURM task, or a pipeline."""
    global _hydra_dir
    _hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    attempt = slurm.attempt() if cfg.deployment.name == "slurm" and not cfg.dry_run else None
    if attempt and not slurm.is_task_zero():
        return slurm.follow_task_zero(_hydra_dir, attempt)
    try:
        own = (is_multirun() or attempt) and not cfg.dry_run  # a sweep point or a SLURM job, perhaps run before
        if own:
            try:
                what, summary = rundir.next_attempt(_hydra_dir, redact(_task_overrides()))
            except ConfigError as err:  # another sweep's point: never written into
                print(err.render(), file=sys.stderr)
                return None
            if what == "skip":
                print(f"skipped: {_hydra_dir} already completed")
                return _objective(summary)
            if what == "resume" and not cfg.resume:
                print(f"resuming {_hydra_dir} from its latest checkpoint (an earlier attempt did not finish)")
                OmegaConf.update(cfg, "resume", str(_hydra_dir.resolve()), force_add=True)
        try:
            return run_one(cfg, own_dir=bool(own))
        except ConfigError as err:
            if not is_multirun():
                raise
            if err.where == "run_dir":  # not this point's directory: nothing is written into it
                print(err.render(), file=sys.stderr)
                return None
            rundir.write_status(_hydra_dir, "invalid", _task_overrides(), reason=err.render())  # the sweep goes on
            print(err.render(), file=sys.stderr)
            return None
    finally:
        if attempt and not slurm.announced(_hydra_dir, attempt):
            slurm.announce(_hydra_dir, attempt, "not launched")  # the other tasks must not wait for a launch


def _write(job: Launch, overrides: list[str]) -> None:
    cfg, run_dir = job.plan.cfg, job.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)  # (a planned pipeline stage's is made here)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (run_dir / "overrides.yaml").write_text(yaml.safe_dump(redact(overrides)))
    for name, config in job.configs.items():  # ds_config.json: the trained model's; other engines' beside it
        (run_dir / f"ds_config{'.' + name if name else ''}.json").write_text(json.dumps(config, indent=2) + "\n")
    (run_dir / "launch.sh").write_text(launch.launch_script(job.cmd, job.env, os.getcwd()))
    (run_dir / "launch.sh").chmod(0o755)
    if job.plan.deployment.name == "multi_node":
        (run_dir / "deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in job.env.items() if k != "DS_ENV_FILE"))
    (run_dir / "plan.json").write_text(json.dumps(job.fit, indent=2) + "\n")
    notes = job.plan.notes + job.notes
    (run_dir / "plan.md").write_text(show.plan_md(cfg, job.configs, job.cmd, job.env, job.fit, notes))
    shutil.rmtree(run_dir / "ranks", ignore_errors=True)  # this attempt's ranks write their own records


def run_one(cfg: DictConfig, overrides: list[str] | None = None, own_dir: bool = False) -> float | None:
    """One run (or, for step=rlhf, a pipeline of runs). `overrides` are given by the pipeline for its stages (their
    config is composed from them already); otherwise they are the command line's. `own_dir`: the run directory is
    this run's own from an earlier attempt (a sweep point, a requeued job, a pipeline stage)."""
    if overrides is not None:  # a pipeline stage
        return _objective(execute(cfg, overrides, explicit=True, own_dir=True)[1])
    overrides = _task_overrides()
    return _objective(start(cfg, overrides, any(key_of(o) == "run_dir" for o in overrides), own_dir)[1])


def start(
    cfg: DictConfig, overrides: list[str], explicit: bool, own_dir: bool = False, worker: str | None = None
) -> tuple[Path | None, dict]:
    """A run or a pipeline from its composed config and the overrides it was composed from (`explicit`: they name
    its run_dir); `worker`: the script every rank runs instead of runner.worker (runner.api). Returns its directory
    and summary (None and {} for a dry run)."""
    if cfg.resume and (
        _hydra_dir is None or Path(os.path.expanduser(str(cfg.resume))).resolve() != _hydra_dir.resolve()
    ):
        cfg, overrides = _resume_config(cfg, overrides)  # (a requeued job resumes its own dir with its own config)
    if cfg.step.name != "rlhf":
        return execute(cfg, overrides, explicit, own_dir, worker)
    if worker:
        raise ConfigError("step", "a pipeline (step=rlhf) runs the methods' own recipes", "launch one stage at a time")
    pipeline.run(
        cfg, [o for o in overrides if key_of(o) != "resume"], run_one, planning.make_plan, _hydra_dir, explicit
    )
    pipeline_dir = Path(os.path.expanduser(str(cfg.run_dir))).resolve()
    done = pipeline_dir / "summary.json"
    return (None, {}) if cfg.dry_run else (pipeline_dir, json.loads(done.read_text()) if done.exists() else {})


def execute(
    cfg: DictConfig, overrides: list[str], explicit: bool, own_dir: bool, worker: str | None = None
) -> tuple[Path | None, dict]:
    """One run: plan and check it, write its directory, launch the ranks, record the outcome; its directory and
    summary."""
    keys.check_added(cfg, overrides)
    if cfg.get("autotune"):
        return _autotune(cfg, overrides)
    raw = bool(cfg.get("ds")) or any(key_of(o).startswith("zero.") for o in overrides)
    try:
        job = prepare(cfg, scrub=_scrub_sweep_file, raw_ds_keys=raw, worker=worker)
    except Finished as done:  # every step, the export and the summary were written; only its record was lost
        run_dir = Path(str(done))
        summary = json.loads((run_dir / "summary.json").read_text())
        rundir.write_status(run_dir, "completed", overrides, note="completed before it was stopped; recorded on resume")
        print(
            f"{run_dir} had written its last checkpoint, its export and its summary before it was stopped: "
            "recorded as completed"
        )
        for line in verdict(summary):
            print(line, file=sys.stderr if line.startswith("warning") else sys.stdout)
        return run_dir, summary
    if job.plan.cfg.dry_run:  # the plan's files are written, its summary printed; nothing is launched
        _write(job, overrides)
        show.plan(job.plan.cfg, job.cmd, job.env, job.fit, job.plan.notes + job.notes, job.run_dir)
        ds, fit = job.configs[""], job.fit
        point = {
            "memory": job.memory,
            "peak_gb": fit["peak_gb"],
            "verdict": fit["verdict"],
            "suggestion": fit.get("suggestion"),
            "tokens_per_s": (fit.get("time") or {}).get("tokens_per_s"),
            "step_s": (fit.get("time") or {}).get("step_s"),
            "world_size": job.plan.world_size,
            "command": job.cmd,
            "train_batch_size": ds["train_batch_size"],
            "zero_stage": ds["zero_optimization"]["stage"],
            "micro_batch_size": ds["train_micro_batch_size_per_gpu"],
        }
        rundir.write_status(job.run_dir, "planned", overrides, plan=point)
        # (a search sweeper such as Optuna's needs a number: every planned point is alike)
        return None, ({"objective": 0.0} if is_multirun() else {})

    run_dir = rundir.claim(job.run_dir, explicit=explicit, resume=bool(cfg.resume) or own_dir)
    if run_dir != job.run_dir:
        move(job, run_dir)
    try:
        return run_dir, _launch(job, overrides)
    finally:
        rundir.release(run_dir)
        if _hydra_dir is not None and _hydra_dir.resolve() != run_dir:
            discard_empty_run_dir()  # Hydra's own job dir, when run_dir= or resume= points elsewhere


def _autotune(cfg: DictConfig, overrides: list[str]) -> tuple[None, dict]:
    """`autotune=true`: plan every candidate, run a short trial of each that fits, write the report and the winning
    recipe (runner.driver.autotune)."""
    from hydra import compose

    from runner.driver import autotune

    autotune.check(cfg)
    base = autotune.base_overrides(overrides)
    planning_dir = Path(os.path.expanduser(str(cfg.tune.dir))).resolve() / "plans"

    def plan_of(candidate: list[str]):
        try:
            composed = compose(config_name="config", overrides=candidate + ["dry_run=true", f"run_dir={planning_dir}"])
            return plan_fit(composed)
        except ConfigError as err:
            return err.render()

    trial = None if cfg.dry_run else autotune.subprocess_trial(os.getcwd())
    result = autotune.search(cfg, base, plan_of, trial)
    report, command = autotune.write(result, base, cfg)
    discard_empty_run_dir()
    print(report.read_text().rstrip())
    if command:
        print(f"\nthe fastest configuration: {command}")
        return None, {"objective": result["best"]["tokens_per_s"]}
    return None, {}


def _launch(job: Launch, overrides: list[str]) -> dict:
    run_dir = job.run_dir
    if job.resume:
        resuming.convert(run_dir, job.resume["tag"], job.resume["convert"], job.configs)
    _write(job, overrides)
    attempt = slurm.attempt() if job.plan.deployment.name == "slurm" else None
    if attempt:  # the other tasks of this job attempt run launch.sh now
        slurm.announce(_hydra_dir, attempt, f"launch {run_dir}")
    rundir.write_status(run_dir, "running", overrides, resumed_from=(job.resume or {}).get("tag"))
    print(f"run directory: {run_dir}")
    print(f"{show.verdict_lines(job.fit)[0]}; the plan: {run_dir / 'plan.md'}")
    for note in job.plan.notes + job.notes:
        print(f"note: {note}")
    ranks = job.plan.world_size
    print(
        f"launching {ranks} rank{'s' * (ranks != 1)} with {job.cmd[0]}: the command is in launch.sh, DeepSpeed's "
        "config in ds_config.json, and everything the launcher and the ranks print in launch.log",
        flush=True,
    )
    began = time.time()
    drawing = artifacts.EarlyCurves(run_dir)  # curves.png, drawn while the launcher winds down
    what = f"resumed from {job.resume['tag']}" if job.resume else "started"
    outcome = supervise.launch(
        job.cmd,
        {
            **os.environ,
            **job.env,
            **job.secret_env,
            "RUNNER_DRIVER_PID": str(os.getpid()),
            "RUNNER_DRIVER_HOST": socket.gethostname(),
        },  # (runner.faults)
        run_dir,
        f"=== {time.strftime('%Y-%m-%d %H:%M:%S')}: {what}: {' '.join(job.cmd)}",
    )
    shm.release(job.plan.deployment.master_port)  # what a rank that died before releasing it left behind
    try:
        return outcome_.record(run_dir, overrides, outcome, time.time() - began, is_multirun(), drawing)
    except outcome_.Ended:
        if is_multirun():  # a sweep stopped at a point: its report is written all the same
            from runner import report

            report.write(Path(HydraConfig.get().sweep.dir))
        raise
    finally:
        drawing.stop.set()  # a run that ended without a summary: the thread stops waiting for one


def _objective(summary: dict) -> float | None:
    objective = summary.get("objective")
    return float(objective) if objective is not None and math.isfinite(objective) else None
