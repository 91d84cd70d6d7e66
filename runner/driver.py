"""What the Hydra process does with a composed config: plan, prepare data, write the run directory, launch."""
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

from runner import launch, plan as planning
from runner.ds_config import build_ds_config, build_ppo_ds_configs
from runner.errors import ConfigError

_hydra_dir: Path | None = None   # the directory Hydra created for this job (removed again if left empty)


def discard_empty_run_dir() -> None:
    """Remove the run directory Hydra made before the job started, if nothing was written to it."""
    path = _hydra_dir
    for _ in range(2):  # the run dir and its step folder, when both are empty
        if path is None or not path.is_dir() or any(path.iterdir()) or path.resolve() == Path.cwd().resolve():
            return
        path.rmdir()
        path = path.parent
        if path.name == "outputs":
            return


def _task_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task)


def redact(overrides: list[str]) -> list[str]:
    """Overrides as they may be written down: the value of any secret-looking key (api_key, token, secret,
    password) replaced by <redacted>."""
    out = []
    for o in overrides:
        key, sep, _ = o.partition("=")
        secret = sep and planning.SECRET_KEY.search(key.lstrip("+~").rsplit(".", 1)[-1])
        out.append(f"{key}=<redacted>" if secret else o)
    return out


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
        raise ConfigError("resume", f"{run_dir} is not a run directory (it has no overrides.yaml)",
                          "pass the directory a previous `python -m runner` printed as its run directory")
    ckpt = run_dir / "checkpoints" / "latest"
    if not ckpt.is_file() and not (run_dir / "pipeline.yaml").is_file():  # a pipeline resumes stage by stage
        raise ConfigError("resume", f"{run_dir} has no checkpoint to resume from (no checkpoints/latest)",
                          "set train.save_every=N so runs save checkpoints, or start a new run without resume=")
    old = yaml.safe_load(saved.read_text()) or []
    new = [o for o in current if not o.split("=", 1)[0].lstrip("+~") in ("resume", "run_dir")]
    if any("<redacted>" in o for o in old):
        raise ConfigError("resume", "the run was started with a secret on the command line (it was not saved)",
                          "put the secret in the environment (e.g. WANDB_API_KEY) and resume again")
    from runner.pipeline import merge_overrides

    kept = merge_overrides(old, new)  # a new value for a key replaces the saved one
    overrides = kept + [f"run_dir={run_dir}", f"resume={run_dir}"]
    return compose(config_name="config", overrides=overrides), kept


def _total_steps(train: DictConfig, steps_per_epoch: int) -> int:
    if train.max_steps:
        return int(train.max_steps)
    return int(train.epochs) * steps_per_epoch


def _print_plan(p: planning.Plan, ds: dict, cmd: list[str], env: dict, memory: dict | None, extra: list[str],
                others: dict | None = None) -> None:
    cfg = OmegaConf.to_container(p.cfg, resolve=True)
    print("# composed recipe\n" + yaml.safe_dump(cfg, sort_keys=False).rstrip())
    print("\n# ds_config.json" + (" (the actor's)" if others else "") + "\n" + json.dumps(ds, indent=2))
    for name, config in (others or {}).items():
        print(f"\n# ds_config.{name}.json\n" + json.dumps(config, indent=2))
    print("\n# launcher command\n" + " ".join(f"{k}={v}" for k, v in sorted(env.items())) + " " +
          " ".join(map(lambda s: s if s and " " not in s else repr(s), cmd)))
    if memory:
        print(f"\n# model-state memory ({memory['source']})\n"
              f"parameters: {memory['num_params']:,}   devices: {memory['devices']}\n"
              f"per device: {memory['per_device_gb']:.2f} GiB   per node (CPU): {memory['per_node_cpu_gb']:.2f} GiB")
    for note in p.notes + extra:
        print(f"note: {note}")


def _slurm_attempt() -> str | None:
    """This SLURM job attempt (job id and requeue count), when running inside an allocation."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    return f"{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"


def _marker(attempt: str) -> Path:
    return _hydra_dir / f".slurm-attempt-{attempt}"


def _follow_slurm_task_zero(attempt: str) -> float | None:
    """Tasks 1..N-1 of a SLURM job: wait for task 0's word on this attempt (it always leaves one), then run the
    launch.sh it wrote (a torchrun agent that joins the rendezvous on the first node), or nothing."""
    marker = _marker(attempt)
    for _ in range(3600):
        if marker.exists():
            break
        time.sleep(1)
    else:
        print(f"error: task 0 left no {marker} in an hour", file=sys.stderr)
        sys.exit(1)
    word = marker.read_text().strip()
    if not word.startswith("launch "):
        print(f"task 0 did not launch ({word}); nothing to do on this node")
        return None
    rc = subprocess.call(["bash", str(Path(word.split(" ", 1)[1]) / "launch.sh")])
    if rc != 0:
        sys.exit(rc)
    return None


def _comparable(overrides: list[str]) -> list[str]:
    return sorted(o for o in overrides if not o.startswith("sweep_name="))


def run(cfg: DictConfig) -> float | None:
    global _hydra_dir
    _hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    attempt = _slurm_attempt() if cfg.deployment.name == "slurm" and not cfg.dry_run else None
    if attempt and os.environ.get("SLURM_PROCID", "0") != "0":
        return _follow_slurm_task_zero(attempt)
    try:
        if (is_multirun() or attempt) and not cfg.dry_run:  # a sweep point or a SLURM job, perhaps run before
            done = finished(_hydra_dir)
            if done is not None and _comparable(done["status"]["overrides"]) == _comparable(redact(_task_overrides())):
                print(f"skipped: {_hydra_dir} already completed")
                return _objective(done["summary"])
            if (_hydra_dir / "checkpoints" / "latest").exists() and not cfg.resume:
                print(f"resuming {_hydra_dir} from its latest checkpoint (an earlier attempt did not finish)")
                OmegaConf.update(cfg, "resume", str(_hydra_dir.resolve()), force_add=True)
            else:  # a fresh attempt: drop what a failed one left
                for name in ("metrics.jsonl", "summary.json", "status.json", "launch.log"):
                    (_hydra_dir / name).unlink(missing_ok=True)
        try:
            return _run(cfg)
        except ConfigError as err:
            if not is_multirun():
                raise
            write_status(_hydra_dir, "invalid", _task_overrides(), reason=err.render())  # recorded; the sweep goes on
            print(err.render(), file=sys.stderr)
            return None
    finally:
        if attempt and not _marker(attempt).exists():
            _marker(attempt).write_text("not launched\n")  # the other tasks must not wait for a launch


def _run(cfg: DictConfig, overrides: list[str] | None = None) -> float | None:
    """One run (or, for step=rlhf, a pipeline of runs). `overrides` are given by the pipeline for its stages (their
    config is composed from them already); otherwise they are the command line's."""
    if overrides is None:
        overrides = _task_overrides()
        if cfg.resume and Path(os.path.expanduser(str(cfg.resume))).resolve() != _hydra_dir.resolve():
            cfg, overrides = _resume_config(cfg, overrides)  # (a requeued job resumes its own dir with its own config)
        if cfg.step.name == "rlhf":
            from runner import pipeline

            return pipeline.run(cfg, [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "resume"])
    p = planning.make_plan(cfg)
    run_dir = Path(os.path.expanduser(str(p.cfg.run_dir))).resolve()

    secrets = planning.secret_keys(p.cfg)
    secret_env, secret_values = {}, []
    for key in secrets:  # never written to the run directory; handed to the ranks through their environment
        value = OmegaConf.select(p.cfg, key)
        if value:
            secret_values.append(str(value))
        if key.startswith("logger.") and value:
            secret_env["WANDB_API_KEY"] = str(value)
        OmegaConf.update(p.cfg, key, None, force_add=True)
    _scrub_sweep_file(secret_values)

    from runner import data, modeling

    ppo = p.cfg.step.name == "ppo"
    if ppo and not p.cfg.step.get("pending_exports"):
        planning.check_tokenizers(p.cfg)
    extra_notes: list[str] = []
    tokenizer, prepared = None, None
    local_inputs = planning.is_local_path(str(p.cfg.model.tokenizer)) and all(
        planning.is_local_path(str(ds.path)) for ds in p.cfg.data.sets.values())
    if p.cfg.dry_run:
        os.environ["HF_HUB_OFFLINE"] = "1"  # a plan never touches the network
    if not p.cfg.dry_run or local_inputs:
        tokenizer = modeling.load_tokenizer(p.cfg.model)
        if p.cfg.dry_run:  # count the samples but write nothing
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                prepared = data.prepare(p.cfg, tokenizer, cache_root=Path(tmp))
        else:
            prepared = data.prepare(p.cfg, tokenizer, cache_root=Path(p.cfg.cache_dir).resolve())
    else:
        extra_notes.append(f"dry run: data sets {', '.join(str(d.path) for d in p.cfg.data.sets.values())} are "
                           "not read, so total_num_steps (epochs x steps per epoch) is computed at launch")
    arch_params = modeling.count_params(p.cfg.model, tokenizer)
    unsupervised = None
    if ppo:  # a step takes generation_batch_size x generation_batches prompts per rank
        per_step = int(p.cfg.step.generation_batch_size) * p.world_size * int(p.cfg.step.generation_batches)
        steps_per_epoch = prepared.counts["train"] // per_step if prepared else 0
        if p.cfg.step.unsupervised.path and tokenizer is not None:
            unsupervised = data.prepare_unsupervised(p.cfg, tokenizer, Path(p.cfg.cache_dir).resolve())
    else:
        steps_per_epoch = prepared.steps_per_epoch(p.cfg.train, p.world_size) if prepared else 0
    total = _total_steps(p.cfg.train, steps_per_epoch)
    if prepared and total < 1:
        what = ("step.generation_batch_size × world size × step.generation_batches prompts" if ppo else
                "micro_batch_size × world size × gradient_accumulation_steps")
        raise ConfigError("step.generation_batch_size" if ppo else "train.micro_batch_size",
                          f"the training split has {prepared.counts['train']} samples, fewer than one step of {what}",
                          "lower the batch size or use more data")
    OmegaConf.update(p.cfg, "runtime", {
        "world_size": p.world_size, "nodes": p.nodes, "total_steps": total, "steps_per_epoch": steps_per_epoch,
        "cwd": os.getcwd(), "run_dir": str(run_dir), "num_params": arch_params,
        "data": prepared.as_dict() if prepared else None, "unsupervised": unsupervised,
        "notes": p.notes + extra_notes}, force_add=True)

    engine_configs = build_ppo_ds_configs(p.cfg, p.world_size, total, str(run_dir)) if ppo else {}
    ds = engine_configs.pop("actor") if ppo else build_ds_config(p.cfg, p.world_size, total, str(run_dir))
    cmd = launch.launcher_command(p.deployment, str(run_dir))
    env = launch.worker_env(p.deployment)
    if p.deployment.name == "multi_node":
        env["DS_ENV_FILE"] = str(run_dir / "deepspeed_env")

    gpus_per_node = max(p.nodes.values())
    largest = p.cfg.model.get("largest_layer_params") or modeling.largest_layer(p.cfg.model, tokenizer)
    from runner.memory import model_state_memory

    memory = model_state_memory(p.cfg, arch_params, largest, gpus_per_node, len(p.nodes))
    if p.cfg.dry_run:
        _print_plan(p, ds, cmd, env, memory, extra_notes, engine_configs)
        if is_multirun():  # a planned sweep: each point keeps its plan for the sweep's plan report
            write_status(_hydra_dir, "planned", overrides, plan={
                "memory": memory, "world_size": p.world_size, "train_batch_size": ds["train_batch_size"],
                "zero_stage": ds["zero_optimization"]["stage"], "micro_batch_size": ds["train_micro_batch_size_per_gpu"],
                "command": cmd})
        else:
            discard_empty_run_dir()
        return None

    if p.cfg.resume:
        saved = json.loads((run_dir / "ds_config.json").read_text())
        if saved["train_batch_size"] != ds["train_batch_size"]:
            raise ConfigError("resume", f"the run was trained with world size × batch = {saved['train_batch_size']} "
                              f"samples per step, this launch would use {ds['train_batch_size']}",
                              "resume on the same number of ranks with the same batch settings")
    if _hydra_dir is not None and _hydra_dir.resolve() != run_dir:
        discard_empty_run_dir()  # Hydra's own job dir, when run_dir= or resume= points elsewhere
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(p.cfg))
    (run_dir / "overrides.yaml").write_text(yaml.safe_dump(redact(overrides)))
    (run_dir / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")
    for name, config in engine_configs.items():  # PPO: ds_config.json is the actor's; the other engines' beside it
        (run_dir / f"ds_config.{name}.json").write_text(json.dumps(config, indent=2) + "\n")
    (run_dir / "launch.sh").write_text(launch.launch_script(cmd, env, os.getcwd()))
    (run_dir / "launch.sh").chmod(0o755)
    if p.deployment.name == "multi_node":
        (run_dir / "deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in env.items() if k != "DS_ENV_FILE"))
    (run_dir / "memory_plan.json").write_text(json.dumps(memory, indent=2) + "\n")
    attempt = _slurm_attempt() if p.deployment.name == "slurm" else None
    if attempt:  # the other tasks of this job attempt run launch.sh now
        _marker(attempt).write_text(f"launch {run_dir}\n")

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
        write_status(run_dir, "failed", overrides, reason=f"exit code {rc}: {reason}", wall_time_s=wall)
        print(f"error: the launcher exited with code {rc} after {wall:.0f} s ({reason}); "
              f"see {run_dir / 'launch.log'}", file=sys.stderr)
        if is_multirun():
            return None  # recorded; the sweep goes on
        sys.exit(rc)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    write_status(run_dir, "completed" if summary else "stopped", overrides, wall_time_s=wall)
    print(f"done in {wall:.0f} s: summary {summary_path}"
          + (f", model {summary['export_dir']}" if summary.get("export_dir") else ""))
    return _objective(summary)


def _objective(summary: dict) -> float | None:
    objective = summary.get("objective")
    return float(objective) if objective is not None and math.isfinite(objective) else None


ERROR_LINE = re.compile(r"(Error|error:|Killed|out of memory|OOM|Traceback)")


def _launch(cmd: list[str], env: dict, log_path: Path) -> tuple[int, str]:
    """Run the launcher, echoing its output and keeping a copy in launch.log; return its exit code and, when it
    failed, the last line that looks like the reason."""
    last_error = ""
    with open(log_path, "w") as log, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            if ERROR_LINE.search(line) and "Traceback" not in line:
                last_error = line.strip().removeprefix("[rank0]: ").removeprefix("[rank1]: ")
        rc = proc.wait()
    return rc, (last_error[:300] or "no error line in the output")


def is_multirun() -> bool:
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def write_status(run_dir: Path, status: str, overrides: list[str], **extra) -> None:
    """status.json: what happened to this run (completed / stopped / failed / invalid), read by sweeps and reports."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "status.json").write_text(json.dumps({"status": status, "overrides": redact(overrides), **extra},
                                                    indent=2) + "\n")


def finished(run_dir: Path) -> dict | None:
    """The status and summary of a run that completed, for sweeps that are run again."""
    path = run_dir / "status.json"
    status = json.loads(path.read_text()) if path.exists() else {}
    if status.get("status") == "completed" and (run_dir / "summary.json").exists():
        return {"status": status, "summary": json.loads((run_dir / "summary.json").read_text())}
    return None
