"""A composed config -> a run: plan, prepare data, write the run directory, launch the ranks, record the outcome.

The Hydra process is the only one that parses the command line. Every check runs before a single file is written,
so bad input leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from runner.driver import launch, pipeline, plan as planning, rundir, slurm
from runner.driver.memory import model_state_memory
from runner.errors import ConfigError
from runner.overrides import key as key_of, merge, redact, secret_keys
from runner.paths import is_local_path

_hydra_dir: Path | None = None  # the directory Hydra created for this job (removed again if left empty)


def discard_empty_run_dir() -> None:
    rundir.discard_if_empty(_hydra_dir)


def _task_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task)


def is_multirun() -> bool:
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


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
    ckpt = run_dir / "checkpoints" / "latest"
    if not ckpt.is_file() and not (run_dir / "pipeline.yaml").is_file():  # a pipeline resumes stage by stage
        raise ConfigError(
            "resume",
            f"{run_dir} has no checkpoint to resume from (no checkpoints/latest)",
            "set train.save_every=N so runs save checkpoints, or start a new run without resume=",
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


def _print_plan(
    p: planning.Plan, configs: dict, cmd: list[str], env: dict, memory: dict | None, extra: list[str]
) -> None:
    cfg = OmegaConf.to_container(p.cfg, resolve=True)
    print("# composed recipe\n" + yaml.safe_dump(cfg, sort_keys=False).rstrip())
    for name, config in configs.items():
        print(
            f"\n# ds_config{'.' + name if name else ''}.json"
            + (" (the trained model's)" if not name and len(configs) > 1 else "")
            + "\n"
            + json.dumps(config, indent=2)
        )
    print(
        "\n# launcher command\n"
        + " ".join(f"{k}={v}" for k, v in sorted(env.items()))
        + " "
        + " ".join(map(lambda s: s if s and " " not in s else repr(s), cmd))
    )
    if memory:
        print(
            f"\n# model-state memory ({memory['source']})\n"
            f"parameters: {memory['num_params']:,}   devices: {memory['devices']}\n"
            f"per device: {memory['per_device_gb']:.2f} GiB   per node (CPU): {memory['per_node_cpu_gb']:.2f} GiB"
        )
    for note in p.notes + extra:
        print(f"note: {note}")


def run(cfg: DictConfig) -> float | None:
    """The Hydra task: one run, a sweep point, a SLURM task, or a pipeline."""
    global _hydra_dir
    _hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    attempt = slurm.attempt() if cfg.deployment.name == "slurm" and not cfg.dry_run else None
    if attempt and not slurm.is_task_zero():
        return slurm.follow_task_zero(_hydra_dir, attempt)
    try:
        if (is_multirun() or attempt) and not cfg.dry_run:  # a sweep point or a SLURM job, perhaps run before
            what, summary = rundir.next_attempt(_hydra_dir, redact(_task_overrides()))
            if what == "skip":
                print(f"skipped: {_hydra_dir} already completed")
                return _objective(summary)
            if what == "resume" and not cfg.resume:
                print(f"resuming {_hydra_dir} from its latest checkpoint (an earlier attempt did not finish)")
                OmegaConf.update(cfg, "resume", str(_hydra_dir.resolve()), force_add=True)
        try:
            return run_one(cfg)
        except ConfigError as err:
            if not is_multirun():
                raise
            rundir.write_status(_hydra_dir, "invalid", _task_overrides(), reason=err.render())  # the sweep goes on
            print(err.render(), file=sys.stderr)
            return None
    finally:
        if attempt and not slurm.announced(_hydra_dir, attempt):
            slurm.announce(_hydra_dir, attempt, "not launched")  # the other tasks must not wait for a launch


def run_one(cfg: DictConfig, overrides: list[str] | None = None) -> float | None:
    """One run (or, for step=rlhf, a pipeline of runs). `overrides` are given by the pipeline for its stages (their
    config is composed from them already); otherwise they are the command line's."""
    if overrides is None:
        overrides = _task_overrides()
        if cfg.resume and Path(os.path.expanduser(str(cfg.resume))).resolve() != _hydra_dir.resolve():
            cfg, overrides = _resume_config(cfg, overrides)  # (a requeued job resumes its own dir with its own config)
        if cfg.step.name == "rlhf":
            return pipeline.run(
                cfg, [o for o in overrides if key_of(o) != "resume"], run_one, planning.make_plan, _hydra_dir
            )
    p = planning.make_plan(cfg)
    method = p.method
    run_dir = Path(os.path.expanduser(str(p.cfg.run_dir))).resolve()

    secret_env, secret_values = {}, []
    for key in secret_keys(p.cfg):  # never written to the run directory; handed to the ranks through their environment
        value = OmegaConf.select(p.cfg, key)
        if value:
            secret_values.append(str(value))
        if key.startswith("logger.") and value:
            secret_env["WANDB_API_KEY"] = str(value)
        OmegaConf.update(p.cfg, key, None, force_add=True)
    _scrub_sweep_file(secret_values)

    from runner import modeling
    from runner.data.prepare import prepare

    pending = planning.pending_sources(p.cfg, method)
    if not pending:
        method.check_sources(p.cfg)
    notes: list[str] = []
    tokenizer, prepared, extra = None, None, None
    local_inputs = (
        not pending
        and is_local_path(str(p.cfg.model.tokenizer))
        and all(is_local_path(str(ds.path)) for ds in p.cfg.data.sets.values())
    )
    if p.cfg.dry_run:
        os.environ["HF_HUB_OFFLINE"] = "1"  # a plan never touches the network
    if not p.cfg.dry_run or local_inputs:
        tokenizer = modeling.load_tokenizer(p.cfg.model)
        if p.cfg.dry_run:  # count the samples but write nothing
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                prepared = prepare(p.cfg, method, tokenizer, cache_root=Path(tmp))
        else:
            cache = Path(p.cfg.cache_dir).resolve()
            prepared = prepare(p.cfg, method, tokenizer, cache_root=cache)
            extra = method.prepare_extra(p.cfg, tokenizer, cache)
    else:
        notes.append(
            f"dry run: data sets {', '.join(str(d.path) for d in p.cfg.data.sets.values())} are "
            "not read, so total_num_steps (epochs x steps per epoch) is computed at launch"
        )
    arch_params = modeling.count_params(p.cfg.model, tokenizer)
    samples, key, what = method.step_samples(p.cfg, p.world_size)
    steps_per_epoch = prepared.counts["train"] // samples if prepared else 0
    total = int(p.cfg.train.max_steps) if p.cfg.train.max_steps else int(p.cfg.train.epochs) * steps_per_epoch
    if prepared and total < 1:
        raise ConfigError(
            key,
            f"the training split has {prepared.counts['train']} samples, fewer than one step of {what} = {samples}",
            "lower the batch size or use more data",
        )
    OmegaConf.update(
        p.cfg,
        "runtime",
        {
            "world_size": p.world_size,
            "nodes": p.nodes,
            "total_steps": total,
            "steps_per_epoch": steps_per_epoch,
            "cwd": os.getcwd(),
            "run_dir": str(run_dir),
            "num_params": arch_params,
            "data": prepared.as_dict() if prepared else None,
            **(extra or {}),
            "notes": p.notes + notes,
        },
        force_add=True,
    )

    configs = method.engine_configs(p.cfg, p.world_size, total, str(run_dir))
    ds = configs[""]
    cmd = launch.launcher_command(p.deployment, str(run_dir))
    env = launch.worker_env(p.deployment)
    if p.deployment.name == "multi_node":
        env["DS_ENV_FILE"] = str(run_dir / "deepspeed_env")

    largest = p.cfg.model.get("largest_layer_params") or modeling.largest_layer(p.cfg.model, tokenizer)
    memory = model_state_memory(p.cfg, arch_params, largest, max(p.nodes.values()), len(p.nodes))
    if p.cfg.dry_run:
        _print_plan(p, configs, cmd, env, memory, notes)
        if is_multirun():  # a planned sweep: each point keeps its plan for the sweep's plan report
            rundir.write_status(
                _hydra_dir,
                "planned",
                overrides,
                plan={
                    "memory": memory,
                    "world_size": p.world_size,
                    "train_batch_size": ds["train_batch_size"],
                    "zero_stage": ds["zero_optimization"]["stage"],
                    "micro_batch_size": ds["train_micro_batch_size_per_gpu"],
                    "command": cmd,
                },
            )
        else:
            discard_empty_run_dir()
        return None

    if p.cfg.resume:
        saved = json.loads((run_dir / "ds_config.json").read_text())
        if saved["train_batch_size"] != ds["train_batch_size"]:
            raise ConfigError(
                "resume",
                f"the run was trained with world size × batch = {saved['train_batch_size']} "
                f"samples per step, this launch would use {ds['train_batch_size']}",
                "resume on the same number of ranks with the same batch settings",
            )
    if _hydra_dir is not None and _hydra_dir.resolve() != run_dir:
        discard_empty_run_dir()  # Hydra's own job dir, when run_dir= or resume= points elsewhere
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(p.cfg))
    (run_dir / "overrides.yaml").write_text(yaml.safe_dump(redact(overrides)))
    for name, config in configs.items():  # ds_config.json: the trained model's; other engines' beside it
        (run_dir / f"ds_config{'.' + name if name else ''}.json").write_text(json.dumps(config, indent=2) + "\n")
    (run_dir / "launch.sh").write_text(launch.launch_script(cmd, env, os.getcwd()))
    (run_dir / "launch.sh").chmod(0o755)
    if p.deployment.name == "multi_node":
        (run_dir / "deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in env.items() if k != "DS_ENV_FILE"))
    (run_dir / "memory_plan.json").write_text(json.dumps(memory, indent=2) + "\n")
    attempt = slurm.attempt() if p.deployment.name == "slurm" else None
    if attempt:  # the other tasks of this job attempt run launch.sh now
        slurm.announce(_hydra_dir, attempt, f"launch {run_dir}")

    print(f"run directory: {run_dir}")
    print(f"DeepSpeed config: {run_dir / 'ds_config.json'}")
    print(f"launch: {' '.join(cmd)}")
    for note in p.notes:
        print(f"note: {note}")
    sys.stdout.flush()
    start = time.time()
    rc, reason = _launch(cmd, {**os.environ, **env, **secret_env}, run_dir / "launch.log")
    wall = time.time() - start
    if rc != 0:
        rundir.write_status(run_dir, "failed", overrides, reason=f"exit code {rc}: {reason}", wall_time_s=wall)
        print(
            f"error: the launcher exited with code {rc} after {wall:.0f} s ({reason}); see {run_dir / 'launch.log'}",
            file=sys.stderr,
        )
        if is_multirun():
            return None  # recorded; the sweep goes on
        sys.exit(rc)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    rundir.write_status(run_dir, "completed" if summary else "stopped", overrides, wall_time_s=wall)
    print(
        f"done in {wall:.0f} s: summary {summary_path}"
        + (f", model {summary['export_dir']}" if summary.get("export_dir") else "")
    )
    return _objective(summary)


def _objective(summary: dict) -> float | None:
    objective = summary.get("objective")
    return float(objective) if objective is not None and math.isfinite(objective) else None


ERROR_LINE = re.compile(r"(Error|error:|Killed|out of memory|OOM|Traceback)")


def _launch(cmd: list[str], env: dict, log_path: Path) -> tuple[int, str]:
    """Run the launcher, echoing its output and keeping a copy in launch.log; return its exit code and, when it
    failed, the last line that looks like the reason."""
    last_error = ""
    with (
        open(log_path, "w") as log,
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc,
    ):
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            if ERROR_LINE.search(line) and "Traceback" not in line:
                last_error = line.strip().removeprefix("[rank0]: ").removeprefix("[rank1]: ")
        rc = proc.wait()
    return rc, (last_error[:300] or "no error line in the output")
