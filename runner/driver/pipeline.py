"""`python -m runner step=rlhf`: several methods in order (by default SFT, reward model, PPO), each stage a run of
its own in a directory under one pipeline directory, each later stage reading the earlier stages' exports.

Every stage's config is composed from the command line's overrides (minus `step=`), `step=<stage>`, the stage's own
list (`step.<stage>=[...]`) and the wiring: each model a stage's method reads (its `sources`, e.g. PPO's actor_from)
is the export of the nearest earlier stage that writes that kind of model. All stages are composed and planned before
anything runs, so a bad key in the last stage stops the pipeline before the first starts. Running the same pipeline
again (`resume=PIPELINE_DIR`) skips the stages that completed and resumes the one that did not.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import yaml
from omegaconf import DictConfig, open_dict

from runner import stages as methods
from runner.driver import rundir
from runner.driver.verdict import verdict
from runner.errors import ConfigError
from runner.overrides import key as key_of, merge, redact

OWN_KEYS = ("name", "stages", "init_from_previous")
RENAMED = {"reward_init_from_sft": "step.init_from_previous"}
DROPPED = ("step", "resume", "run_dir", "hydra")


def pipeline_keys() -> tuple[str, ...]:
    return OWN_KEYS + tuple(methods.names())


def _producer(stages: list[str], name: str, kinds: tuple[str, ...]) -> tuple[str, str] | None:
    """The nearest stage before `name` that exports a model of one of `kinds` (any model when kinds is empty), and
    the export directory's name."""
    for earlier in reversed(stages[: stages.index(name)]):
        for export, kind in methods.get(earlier).exports.items():
            if not kinds or kind in kinds:
                return earlier, export
    return None


def stage_overrides(cfg: DictConfig, overrides: list[str], pipeline_dir: Path, name: str) -> list[str]:
    stages = list(cfg.step.stages)
    for o in overrides:
        key = key_of(o)
        if key.startswith("step.") and key.split(".")[1] not in pipeline_keys():
            raise ConfigError(
                key,
                "is a key of one stage, and this command runs a pipeline of stages",
                f"put it in that stage's list, e.g. 'step.{stages[-1]}=[{o}]'",
            )
    base = [o for o in overrides if key_of(o).split(".")[0] not in DROPPED and key_of(o) != "dry_run"]
    own = [str(o) for o in (cfg.step.get(name) or [])]
    wiring = [f"step={name}", f"run_dir={pipeline_dir / name}"]
    for src in methods.get(name).sources:
        if src.optional and not cfg.step.init_from_previous:
            continue
        found = _producer(stages, name, src.kinds)
        if found:
            wiring.append(f"step.{src.key}={pipeline_dir / found[0] / found[1]}")
        elif not src.optional and not any(key_of(o) == f"step.{src.key}" for o in own):
            raise ConfigError(
                "step.stages",
                f"the {name} stage reads {src.what} (step.{src.key}) from an earlier "
                f"stage, and none of {stages[: stages.index(name)]} writes one",
                f"add a stage that does before {name}, give it in the stage's list "
                f"('step.{name}=[step.{src.key}=DIR]'), or run step={name} on its own",
            )
    return merge(base, [wiring[0]], own, wiring[1:], [f"dry_run={str(bool(cfg.dry_run)).lower()}"])


def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose

    try:
        stage_cfg = hydra_compose(config_name="config", overrides=overrides)
    except Exception as exc:  # a bad override of one stage's list
        raise ConfigError(
            "step",
            f"the stage overrides {overrides} do not compose: {str(exc).splitlines()[0]}",
            "fix the stage's list (step.<stage>=[...])",
        ) from None
    return strip_pipeline_keys(stage_cfg)


def strip_pipeline_keys(stage_cfg: DictConfig) -> DictConfig:
    """A pipeline recipe's own keys (step.stages, step.sft, ...) are merged into every stage's `step`: drop them."""
    with open_dict(stage_cfg):
        for key in pipeline_keys()[1:] + tuple(RENAMED):
            if key in stage_cfg.step and key != stage_cfg.step.name:
                stage_cfg.step.pop(key)
    return stage_cfg


def _check(cfg: DictConfig) -> list[str]:
    for old, new in RENAMED.items():
        if cfg.step.get(old) is not None:
            raise ConfigError(
                f"step.{old}",
                f"was renamed to {new} (true: every stage that can start from an earlier stage's model does)",
                f"use {new}={str(cfg.step[old]).lower()}",
            )
    stages = list(cfg.step.stages or [])
    known = methods.names()
    if not stages or any(s not in known for s in stages) or len(set(stages)) != len(stages):
        raise ConfigError(
            "step.stages",
            f"must list distinct stages from {known}, got {stages}",
            "e.g. step.stages=[sft,reward,ppo] or step.stages=[sft,dpo]",
        )
    return stages


def run(
    cfg: DictConfig,
    overrides: list[str],
    run_one: Callable[[DictConfig, list[str]], object],
    plan_one: Callable[[DictConfig], object],
    hydra_dir: Path | None,
    explicit: bool = True,
) -> float | None:
    """Plan every stage, then run them in order with `run_one(stage_cfg, stage_overrides)`. The pipeline directory
    is claimed for this pipeline alone (`explicit`: it was named on the command line, so it is never replaced)."""
    pipeline_dir = Path(str(cfg.run_dir)).expanduser().resolve()
    stages = _check(cfg)
    per_stage = {name: stage_overrides(cfg, overrides, pipeline_dir, name) for name in stages}

    # Plan every stage before running any: a later stage's exports do not exist yet (pending_exports).
    for name in stages:
        stage_cfg = compose(per_stage[name] + (["+step.pending_exports=true"] if name != stages[0] else []))
        if not cfg.dry_run:
            plan_one(stage_cfg)

    if cfg.dry_run:
        return _run_stages(cfg, stages, per_stage, pipeline_dir, run_one)
    claimed = rundir.claim(pipeline_dir, explicit=explicit, resume=bool(cfg.resume))
    if claimed != pipeline_dir:  # another pipeline started in the same second took the default directory
        print(f"note: {pipeline_dir} belongs to another run started in the same second; this pipeline uses {claimed}")
        cfg.run_dir = str(claimed)
        return run(cfg, overrides, run_one, plan_one, hydra_dir, explicit=True)
    try:
        if hydra_dir is not None and hydra_dir.resolve() != pipeline_dir:
            rundir.discard_if_empty(hydra_dir)  # Hydra's job dir, when resume= points at the pipeline elsewhere
        (pipeline_dir / "overrides.yaml").write_text(yaml.safe_dump(redact(overrides)))
        record = {"stages": stages, "overrides": {n: redact(o) for n, o in per_stage.items()}}
        (pipeline_dir / "pipeline.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
        return _run_stages(cfg, stages, per_stage, pipeline_dir, run_one)
    finally:
        rundir.release(pipeline_dir)


def _run_stages(cfg: DictConfig, stages: list[str], per_stage: dict, pipeline_dir: Path, run_one) -> float | None:
    results: dict[str, dict] = {}
    for name in stages:
        stage_dir = pipeline_dir / name
        print(f"\n=== pipeline stage {name}: {stage_dir}", flush=True)
        stage_list = list(per_stage[name])
        if not cfg.dry_run:
            what, summary = rundir.next_attempt(stage_dir)
            if what == "skip":
                print(f"{name}: completed earlier, skipped")
                results[name] = {"status": "skipped (completed earlier)", "summary": summary}
                continue
            if what == "resume":
                print(f"{name}: resuming from its latest checkpoint")
                stage_list.append(f"resume={stage_dir}")
        elif name != stages[0]:
            stage_list.append("+step.pending_exports=true")
        try:
            run_one(compose(stage_list), stage_list)
        except SystemExit as exc:
            if not cfg.dry_run:
                _write_summary(pipeline_dir, stages, results, failed=name)
            what = "stopped" if exc.code == 75 else "failed"
            print(
                f"pipeline stage {name} {what}; continue with `python -m runner resume={pipeline_dir}` (finished "
                "stages are skipped)",
                file=sys.stderr,
            )
            raise exc
        if not cfg.dry_run:
            done = rundir.finished(stage_dir)
            if done is None:  # stopped on purpose (train.stop_at_step): a later stage has nothing to read yet
                results[name] = {"status": "stopped (train.stop_at_step)"}
                _write_summary(pipeline_dir, stages, results)
                print(f"pipeline paused after stage {name}; continue with `python -m runner resume={pipeline_dir}`")
                return None
            results[name] = {"status": "completed", "summary": done["summary"]}
    if cfg.dry_run:
        return None
    summary = _write_summary(pipeline_dir, stages, results)
    print(f"\npipeline done: {pipeline_dir}")
    for name in stages:
        done = results.get(name, {}).get("summary") or {}
        for line in verdict(done, name):
            print(line, file=sys.stderr if line.startswith("warning") else sys.stdout)
        if done.get("export_dir"):
            print(f"{name}: model {done['export_dir']}")
    return summary.get("objective")


POLICY_KEYS = (
    "eval_judge",
    "eval_reward_initial",
    "eval_reward_final",
    "eval_reward_gain",
    "eval_pass_rate_initial",
    "eval_pass_rate_final",
    "eval_kl",
    "export_dir",
    "ema_export_dir",
    "critic_export_dir",
)


def _write_summary(pipeline_dir: Path, stages: list[str], results: dict, failed: str | None = None) -> dict:
    """summary.json of the pipeline: each stage's status, run directory, export and headline metrics; for stages
    that train a policy, the held-out reward before and after."""
    finished = all(results.get(n, {}).get("status", "").startswith(("completed", "skipped")) for n in stages)
    status = f"failed at {failed}" if failed else ("completed" if finished else "paused")
    summary: dict = {"pipeline_dir": str(pipeline_dir), "status": status, "stages": {}}
    for name in stages:
        entry = results.get(name)
        s = (entry or {}).get("summary", {})
        summary["stages"][name] = {
            "status": entry["status"] if entry else ("failed" if name == failed else "not run"),
            "run_dir": str(pipeline_dir / name),
            "export_dir": s.get("export_dir"),
            "objective": s.get("objective"),
            "objective_name": s.get("objective_name"),
        }
        if "eval_reward_gain" in s:
            summary[name] = {k: s.get(k) for k in POLICY_KEYS}
        if s:
            summary["objective"] = s.get("objective")
    (pipeline_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
