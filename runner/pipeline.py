"""`python -m runner step=rlhf`: SFT, reward model and PPO in order, each stage a run of its own in a directory under
one pipeline directory, each later stage reading the earlier stages' exports.

Every stage's config is composed from the command line's overrides (minus `step=`), `step=<stage>`, the stage's own
list (`step.<stage>=[...]`) and the wiring (run_dir, PPO's actor_from / critic_from); all three are composed and
planned before anything runs, so a bad key in the PPO stage stops the pipeline before SFT starts. Running the same
pipeline again (`resume=PIPELINE_DIR`) skips the stages that completed and resumes the one that did not.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from omegaconf import DictConfig, open_dict

from runner import driver, plan as planning
from runner.errors import ConfigError

PIPELINE_KEYS = ("stages", "reward_init_from_sft", "sft", "reward", "ppo")
DROPPED = ("step", "resume", "run_dir", "hydra")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(*lists: list[str]) -> list[str]:
    """Concatenate override lists; a later override of the same key replaces an earlier one (in its place)."""
    merged: dict[str, str] = {}
    for overrides in lists:
        for o in overrides:
            merged.pop(_key(o), None)
            merged[_key(o)] = o
    return list(merged.values())


def stage_overrides(cfg: DictConfig, overrides: list[str], pipeline_dir: Path, name: str) -> list[str]:
    for o in overrides:
        key = _key(o)
        if key.startswith("step.") and key.split(".")[1] not in PIPELINE_KEYS:
            raise ConfigError(key, "is a key of one stage, and this command runs a pipeline of stages",
                              f"put it in that stage's list, e.g. 'step.ppo=[{o}]'")
    base = [o for o in overrides if _key(o).split(".")[0] not in DROPPED and _key(o) != "dry_run"]
    wiring = [f"step={name}", f"run_dir={pipeline_dir / name}"]
    if name == "reward" and cfg.step.reward_init_from_sft and "sft" in cfg.step.stages:
        wiring.append(f"step.init_from={pipeline_dir / 'sft' / 'export'}")
    if name == "ppo":
        wiring += [f"step.actor_from={pipeline_dir / 'sft' / 'export'}",
                   f"step.critic_from={pipeline_dir / 'reward' / 'export'}"]
    own = [str(o) for o in (cfg.step.get(name) or [])]
    return merge_overrides(base, [wiring[0]], own, wiring[1:], [f"dry_run={str(bool(cfg.dry_run)).lower()}"])


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose

    try:
        stage_cfg = compose(config_name="config", overrides=overrides)
    except Exception as exc:  # a bad override of one stage's list
        raise ConfigError("step", f"the stage overrides {overrides} do not compose: {str(exc).splitlines()[0]}",
                          "fix the stage's list (step.sft / step.reward / step.ppo)") from None
    return strip_pipeline_keys(stage_cfg)


def strip_pipeline_keys(stage_cfg: DictConfig) -> DictConfig:
    """A pipeline recipe's own keys (step.stages, step.sft, ...) are merged into every stage's `step`: drop them."""
    with open_dict(stage_cfg):
        for key in PIPELINE_KEYS:
            if key in stage_cfg.step:
                stage_cfg.step.pop(key)
    return stage_cfg


def run(cfg: DictConfig, overrides: list[str]) -> float | None:
    pipeline_dir = Path(str(cfg.run_dir)).expanduser().resolve()
    stages = list(cfg.step.stages)
    if not stages or any(s not in planning.STAGES for s in stages):
        raise ConfigError("step.stages", f"must list stages from {list(planning.STAGES)}, got {stages}")
    if "ppo" in stages and not {"sft", "reward"} <= set(stages):
        raise ConfigError("step.stages", "PPO in a pipeline reads the SFT and reward exports of the same pipeline",
                          "use step.stages=[sft,reward,ppo], or run step=ppo on its own with step.actor_from / "
                          "step.critic_from")
    per_stage = {name: stage_overrides(cfg, overrides, pipeline_dir, name) for name in stages}

    # Plan every stage before running any: a later stage's exports do not exist yet (pending_exports).
    for name in stages:
        stage_cfg = _compose(per_stage[name] + (["+step.pending_exports=true"] if name != stages[0] else []))
        if not cfg.dry_run:
            planning.make_plan(stage_cfg)

    if not cfg.dry_run:
        if driver._hydra_dir is not None and driver._hydra_dir.resolve() != pipeline_dir:
            driver.discard_empty_run_dir()  # Hydra's job dir, when resume= points at the pipeline elsewhere
        pipeline_dir.mkdir(parents=True, exist_ok=True)
        (pipeline_dir / "overrides.yaml").write_text(yaml.safe_dump(driver.redact(overrides)))
        (pipeline_dir / "pipeline.yaml").write_text(yaml.safe_dump(
            {"stages": stages, "overrides": {n: driver.redact(o) for n, o in per_stage.items()}}, sort_keys=False))
    results: dict[str, dict] = {}
    for name in stages:
        stage_dir = pipeline_dir / name
        print(f"\n=== pipeline stage {name}: {stage_dir}", flush=True)
        stage_list = list(per_stage[name])
        done = None if cfg.dry_run else driver.finished(stage_dir)
        if done is not None:
            print(f"{name}: completed earlier, skipped")
            results[name] = {"status": "skipped (completed earlier)", "summary": done["summary"]}
            continue
        if not cfg.dry_run and (stage_dir / "checkpoints" / "latest").is_file():
            print(f"{name}: resuming from its latest checkpoint")
            stage_list.append(f"resume={stage_dir}")
        elif not cfg.dry_run:
            for stale in ("metrics.jsonl", "summary.json", "status.json", "launch.log", "samples.jsonl"):
                (stage_dir / stale).unlink(missing_ok=True)
        if cfg.dry_run and name != stages[0]:
            stage_list.append("+step.pending_exports=true")
        try:
            driver._run(_compose(stage_list), overrides=stage_list)
        except SystemExit as exc:
            if not cfg.dry_run:
                _write_summary(pipeline_dir, stages, results, failed=name)
            print(f"error: pipeline stage {name} failed; fix it and run `python -m runner resume={pipeline_dir}` "
                  "(finished stages are skipped)", file=sys.stderr)
            raise exc
        if not cfg.dry_run:
            done = driver.finished(stage_dir)
            if done is None:  # stopped on purpose (train.stop_at_step): a later stage has nothing to read yet
                results[name] = {"status": "stopped (train.stop_at_step)"}
                _write_summary(pipeline_dir, stages, results)
                print(f"pipeline paused after stage {name}; continue with `python -m runner resume={pipeline_dir}`")
                return None
            results[name] = {"status": "completed", "summary": done["summary"]}
    if cfg.dry_run:
        return None
    summary = _write_summary(pipeline_dir, stages, results)
    if "ppo" in summary:
        p = summary["ppo"]
        print(f"\npipeline done: {pipeline_dir}\nPPO raised the mean reward on held-out prompts from "
              f"{p['eval_reward_initial']:.3f} (SFT policy) to {p['eval_reward_final']:.3f} "
              f"({p['eval_reward_gain']:+.3f}); actor: {p.get('export_dir')}")
    return summary.get("objective")


def _write_summary(pipeline_dir: Path, stages: list[str], results: dict, failed: str | None = None) -> dict:
    """summary.json of the pipeline: each stage's status, run directory, export and headline metrics; PPO's
    evaluation reward before (the SFT policy) and after PPO on the eval prompts."""
    finished = all(results.get(n, {}).get("status", "").startswith(("completed", "skipped")) for n in stages)
    status = f"failed at {failed}" if failed else ("completed" if finished else "paused")
    summary: dict = {"pipeline_dir": str(pipeline_dir), "status": status, "stages": {}}
    for name in stages:
        entry = results.get(name)
        s = (entry or {}).get("summary", {})
        summary["stages"][name] = {"status": entry["status"] if entry else ("failed" if name == failed else
                                                                            "not run"),
                                   "run_dir": str(pipeline_dir / name), "export_dir": s.get("export_dir"),
                                   "objective": s.get("objective"), "objective_name": s.get("objective_name")}
    ppo = results.get("ppo", {}).get("summary")
    if ppo:
        summary["ppo"] = {k: ppo.get(k) for k in ("eval_reward_initial", "eval_reward_final", "eval_reward_gain",
                                                  "eval_kl", "export_dir", "ema_export_dir", "critic_export_dir")}
        summary["objective"] = ppo.get("eval_reward_final")
    (pipeline_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
