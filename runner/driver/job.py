"""A run, prepared: everything it needs (plan, data, step count, every engine's DeepSpeed JSON, the launcher
command, what a resume starts from), checked before anything of its run directory is written."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from omegaconf import OmegaConf

from runner.driver import checks, ds_check, fit, launch, plan as planning, resume as resuming
from runner.driver.memory import run_memory
from runner.errors import ConfigError
from runner.overrides import secret_keys
from runner.paths import is_local_path


class Finished(Exception):
    """A run asked to resume had written its last checkpoint, export and summary before it was stopped."""


def rundir_status(run_dir: Path) -> str | None:
    import json

    try:
        return json.loads((run_dir / "status.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


@dataclasses.dataclass
class Launch:
    """Everything a run needs, checked, before anything of the run directory is written."""

    plan: planning.Plan
    run_dir: Path
    configs: dict[str, dict]
    cmd: list[str]
    env: dict[str, str]
    secret_env: dict[str, str]
    memory: dict
    notes: list[str]
    resume: dict | None = None
    worker: str | None = None  # a script the ranks run instead of runner.worker (runner.api)
    fit: dict | None = None  # runner.driver.fit.assess: peak per device, verdict, suggestion, time estimate


def memory_fit(p: planning.Plan, sizes: dict) -> tuple[dict, dict]:
    """The plan's verdict (runner.driver.fit) from the model's size and the other engines' (`sizes`: name ->
    (parameters, largest layer) or None when unknown); no data is read. Returns it and the completed sizes."""
    from runner import modeling

    model = p.cfg.model
    # a local checkpoint's safetensors headers count its weights in milliseconds; building even a meta model of the
    # architecture imports transformers' model code and torch (seconds)
    counted = None if model.get("num_params") else modeling.weights_numel(model.get("path"))
    arch_params = modeling.planned_params(model)
    largest = counted[1] if counted else model.get("largest_layer_params") or modeling.largest_layer(model)
    sizes = {"": (arch_params, largest), **{k: v for k, v in sizes.items() if v}}
    configs = p.method.engine_configs(p.cfg, p.world_size, 1, "/nonexistent")
    return fit.assess(p.cfg, p.method, configs, sizes, max(p.nodes.values()), len(p.nodes)), sizes


def plan_fit(cfg) -> dict:
    """A composed config's plan and verdict, without reading any data (the autotuner's candidates)."""
    from runner import modeling

    p = planning.make_plan(cfg)
    sizes = {name: modeling.weights_numel(src) if src else None for name, src in p.method.engine_sources(p.cfg).items()}
    steps = p.cfg.train.max_steps
    got, sizes = memory_fit(p, sizes)
    got["time"] = fit.time_estimate(p.cfg, p.method, sizes, p.world_size, int(steps) if steps else None)
    return got


def prepare(cfg, scrub=lambda values: None, raw_ds_keys: bool = False, worker: str | None = None) -> Launch:
    """The run, planned and checked; `scrub(secrets)` takes secrets out of what Hydra wrote; `raw_ds_keys`: the
    config adds raw DeepSpeed keys, so DeepSpeed's own parser checks every JSON; `worker`: a Python file the ranks
    run instead of runner.worker."""
    p = planning.make_plan(cfg)
    method = p.method
    run_dir = Path(os.path.expanduser(str(p.cfg.run_dir))).resolve()
    if not p.cfg.dry_run:
        checks.writable_dir(run_dir, "run_dir")
        checks.writable_dir(Path(p.cfg.cache_dir).resolve(), "cache_dir")

    secret_env, secret_values = {}, []
    for key in secret_keys(p.cfg):  # never written to the run directory; handed to the ranks through their environment
        value = OmegaConf.select(p.cfg, key)
        if value:
            secret_values.append(str(value))
        if key.startswith("logger.") and value:
            secret_env["WANDB_API_KEY"] = str(value)
        OmegaConf.update(p.cfg, key, None, force_add=True)
    scrub(secret_values)

    from runner import modeling
    from runner.data.prepare import prepare as prepare_data, share_notes

    # checks that need no data first: data preparation writes the shared cache
    ds_check.check(p.cfg, method.engine_configs(p.cfg, p.world_size, 1, str(run_dir)), raw_ds_keys)
    pending = planning.pending_sources(p.cfg, method)
    if not pending:
        method.check_sources(p.cfg)
    sizes = {name: modeling.weights_numel(src) if src else None for name, src in method.engine_sources(p.cfg).items()}
    # does it fit? (before the data is prepared: a run that cannot fit writes nothing)
    fit_, sizes = memory_fit(p, sizes)
    if fit_["verdict"] == "does not fit" and not p.cfg.dry_run and p.cfg.plan.on_unfit != "launch":
        raise ConfigError("plan", *fit.refusal(fit_))
    gpus_per_node, nodes = max(p.nodes.values()), len(p.nodes)
    notes: list[str] = []
    prepared, extra, loaded = None, None, {}

    def tokenizer():  # loaded once, and only when something needs it (not on a data-cache hit)
        if "tok" not in loaded:
            loaded["tok"] = modeling.load_tokenizer(p.cfg.model)
        return loaded["tok"]

    local_inputs = (
        not pending
        and is_local_path(str(p.cfg.model.tokenizer))
        and all(is_local_path(str(ds.path)) for ds in p.cfg.data.sets.values())
    )
    cache = Path(p.cfg.cache_dir).resolve()
    if p.cfg.dry_run:
        os.environ["HF_HUB_OFFLINE"] = "1"  # a plan never touches the network
        if local_inputs:  # count the samples from the cache, or into a temporary one: a plan writes nothing
            import tempfile

            prepared = prepare_data(p.cfg, method, tokenizer, cache, build=False)
            if prepared is None:
                with tempfile.TemporaryDirectory() as tmp:
                    prepared = prepare_data(p.cfg, method, tokenizer, Path(tmp))
        elif not p.cfg.train.max_steps:
            notes.append(
                f"dry run: data sets {', '.join(str(d.path) for d in p.cfg.data.sets.values())} are not "
                "read, so total_num_steps (epochs x steps per epoch) is computed at launch"
            )
    else:
        prepared = prepare_data(p.cfg, method, tokenizer, cache)
        extra = method.prepare_extra(p.cfg, tokenizer, cache)
    if prepared:
        notes += share_notes(prepared, p.cfg.data.split, method.name)
    samples, key, what = method.step_samples(p.cfg, p.world_size)
    steps_per_epoch = prepared.counts["train"] // samples if prepared else 0
    total = int(p.cfg.train.max_steps) if p.cfg.train.max_steps else int(p.cfg.train.epochs) * steps_per_epoch
    if prepared and (total < 1 or prepared.counts["train"] < samples):  # (whatever train.max_steps says)
        raise ConfigError(
            key,
            f"the training split has {prepared.counts['train']} "
            f"{'packed rows' if p.cfg.data.get('packing') else 'samples'}, fewer than one step of {what} = {samples}",
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
            "num_params": sizes[""][0],
            "data": prepared.as_dict() if prepared else None,
            **(extra or {}),
            "notes": p.notes + notes,
            "resume": None,
        },
        force_add=True,
    )
    configs = method.engine_configs(p.cfg, p.world_size, total, str(run_dir))
    resume = None
    if p.cfg.resume and not p.cfg.dry_run:
        tag, step, convert, resume_notes = resuming.plan(
            run_dir, configs, method.checkpointed, method.has_rank_state(p.cfg)
        )
        if step == total and (run_dir / "summary.json").exists() and rundir_status(run_dir) != "completed":
            raise Finished(run_dir)  # killed after its last work was written (e.g. while the ranks shut down)
        if step > total or (step == total and (run_dir / "summary.json").exists()):
            raise ConfigError(
                "resume",
                f"the run has done all its {total} steps (checkpoint {tag})",
                "raise train.max_steps (or train.epochs) to train it further",
            )
        if step == total:  # stopped after its last checkpoint, before its export and summary were written
            resume_notes.append(f"every step is done (checkpoint {tag}): resuming writes the export and the summary")
        for name, universal in convert.items():
            if universal:
                configs[name]["checkpoint"] = {"load_universal": True}
        resume = {
            "tag": tag,
            "step": step,
            "universal": [n for n, u in convert.items() if u],
            "resharded": bool(convert),
            "convert": convert,
        }
        notes += resume_notes
        p.cfg.runtime.resume = {k: v for k, v in resume.items() if k != "convert"}
    env = launch.worker_env(p.deployment)
    if p.deployment.name == "multi_node":
        env["DS_ENV_FILE"] = str(run_dir / "deepspeed_env")
    memory = run_memory(p.cfg, configs, sizes, gpus_per_node, nodes)
    fit_["time"] = fit.time_estimate(p.cfg, method, sizes, p.world_size, total)
    cmd = launch.launcher_command(p.deployment, str(run_dir), worker)
    return Launch(p, run_dir, configs, cmd, env, secret_env, memory, notes, resume, worker, fit_)


def move(job: Launch, run_dir: Path) -> None:
    """The run goes to another directory (its default one was taken by a run started in the same second)."""
    print(f"note: {job.run_dir} belongs to another run started in the same second; this run uses {run_dir}")
    job.run_dir = run_dir
    job.plan.cfg.run_dir = job.plan.cfg.runtime.run_dir = str(run_dir)
    job.configs = job.plan.method.engine_configs(
        job.plan.cfg, job.plan.world_size, int(job.plan.cfg.runtime.total_steps), str(run_dir)
    )
    job.cmd = launch.launcher_command(job.plan.deployment, str(run_dir), job.worker)
    if "DS_ENV_FILE" in job.env:
        job.env["DS_ENV_FILE"] = str(run_dir / "deepspeed_env")
