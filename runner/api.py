"""The runner from Python, in the spirit of DeepSpeed-Chat's DeepSpeedRLHFEngine / DeepSpeedPPOTrainer.

The driver's side (any Python process; importing this module does not import torch) composes a config with Hydra's
compose API, plans it and launches it, as `python -m runner OVERRIDES` does:

    from runner import api
    cfg = api.compose(["step=grpo", "reward=tiny"])                 # the composed config (DictConfig)
    plan = api.plan(["model=opt-13b", "zero=stage3", "deployment=single_node"])   # what dry_run=true prints
    plan.ds_configs[""], plan.command, plan.memory["per_device_gb"]
    result = api.launch(["debug=quick"])                             # trains: result.run_dir, result.summary

The ranks' side runs your own training loop on a method's engines. The driver launches your script on every rank
(`api.launch(overrides, worker="my_loop.py")`: `deepspeed ... my_loop.py RUN_DIR`), and the script does:

    with api.Session(run_dir) as session:          # joins the process group, reads the run's config.yaml
        trainer = session.trainer()                 # the method's engines, judge and data (GRPO: policy, reference)
        for step in range(1, session.total_steps + 1):
            rollout = trainer.generate_experience() # answers, log-probs, scores, advantages
            stats = trainer.train(rollout, step)    # the update; metrics, means over ranks
            session.log(step, stats)                # metrics.jsonl (and the logger group's tracker)
        session.finish(trainer)                     # the export and summary.json; leaving the block ends the rank

examples/custom_grpo_loop.py is a complete one. Bad input raises runner.errors.ConfigError (its message names the key
and the fix); a run that did not complete raises RunFailed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from runner.errors import ConfigError
from runner.overrides import key as key_of

CONF = Path(__file__).resolve().parent.parent / "conf"


# ------------------------------------------------------------------------------------------ the driver's side
@dataclasses.dataclass
class Plan:
    """A planned run, as `python -m runner dry_run=true` prints it."""

    config: DictConfig  # resolved: every `auto` replaced, plus `runtime` (world size, total steps, data counts)
    ds_configs: dict[str, dict]  # "" = the trained model's ds_config.json; other engines' by name (reference, ...)
    command: list[str]  # the launcher command
    env: dict[str, str]  # the environment the runner gives the ranks
    memory: dict  # DeepSpeed's estimate of model-state memory per device (per_device_gb, per_node_cpu_gb, ...)
    notes: list[str]  # the choices the planner made (deployment=auto chose ..., precision ...)
    world_size: int
    run_dir: Path  # where a launch of the same overrides would write (a default one is timestamped)
    fit: dict  # the verdict against the hardware: peak_gb, headroom, verdict, terms_gb, suggestion, time (plan.md)


@dataclasses.dataclass
class Result:
    run_dir: Path | None  # the run's (or the pipeline's) directory; None for dry_run=true
    summary: dict  # its summary.json
    status: str  # completed, or stopped (train.stop_at_step), or planned (dry_run=true)


class RunFailed(Exception):
    """A launched run that did not complete (failed, preempted, aborted): its directory's status.json says how."""

    def __init__(self, run_dir: Path | None, status: str, exit_code: int, reason: str = ""):
        self.run_dir, self.status, self.exit_code, self.reason = run_dir, status, exit_code, reason
        super().__init__(f"the run {status} (exit code {exit_code}){': ' + reason if reason else ''}; see {run_dir}")


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config `python -m runner OVERRIDES` composes (conf/ through Hydra's compose API); run_dir is filled in
    as the command line fills it (outputs/<step>/<date>_<time>) unless an override sets it."""
    with _hydra(overrides):
        return _compose(overrides)[0]


def plan(overrides: list[str] | tuple[str, ...] = ()) -> Plan:
    """Plan a run without running it or writing anything (the checks and choices of `dry_run=true`): the resolved
    config, every DeepSpeed JSON, the launcher command and the memory estimate."""
    from runner.driver.job import prepare

    offline = os.environ.get("HF_HUB_OFFLINE")
    try:
        with _hydra(overrides):
            cfg, _ = _compose([*overrides, "dry_run=true"])
            job = prepare(cfg)
    finally:  # (a plan never touches the network: prepare sets HF_HUB_OFFLINE for this process)
        if offline is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = offline
    p = job.plan
    notes = p.notes + job.notes
    return Plan(p.cfg, job.configs, job.cmd, job.env, job.memory, notes, p.world_size, job.run_dir, job.fit)


def launch(overrides: list[str] | tuple[str, ...] = (), worker: str | Path | None = None) -> Result:
    """Run it, as `python -m runner OVERRIDES` does (a pipeline for step=rlhf; `resume=RUN` continues a run), with
    the console output of the command line; returns when the ranks have finished. `worker`: a Python file every rank
    runs with the run directory as its argument, instead of the method's recipe (a loop of your own, see Session).
    The run's overrides are recorded in its directory: `python -m runner resume=RUN` continues it (with the recipe)."""
    from runner.driver import outcome, run as driver

    script = str(Path(worker).resolve()) if worker else None
    if script and not Path(script).is_file():
        raise ConfigError("worker", f"{script} is not a file", "pass the path of the Python script the ranks run")
    with _hydra(overrides):
        cfg, explicit = _compose(overrides)
        if cfg.deployment.name == "slurm":
            raise ConfigError(
                "deployment", "SLURM jobs are submitted by Hydra's submitit launcher", "use the command line"
            )
        try:
            run_dir, summary = driver.start(cfg, list(overrides), explicit, worker=script)
        except outcome.Ended as ended:
            status = _status(ended.run_dir)
            code, reason = int(ended.code), status.get("reason", "")
            raise RunFailed(ended.run_dir, status.get("status", "failed"), code, reason) from None
    if run_dir is None:
        return Result(None, summary, "planned")
    return Result(run_dir, summary, _status(run_dir).get("status") or summary.get("status", "completed"))


def _status(run_dir: Path | None) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, TypeError, ValueError):
        return {}


@contextlib.contextmanager
def _hydra(overrides):
    """Hydra initialised on conf/ (as @hydra.main does for the command line); its composition errors as the runner's
    (an unknown key names the closest one)."""
    import hydra
    from hydra.errors import HydraException

    try:
        with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            yield
    except HydraException as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        unknown = message.startswith("Could not override '") and message.split("'")[1]
        if unknown:
            from runner.driver.keys import is_group_choice, unknown_key_error

            raise unknown_key_error(unknown, str(CONF), [o for o in overrides if is_group_choice(o)]) from None
        raise ConfigError("overrides", message, "python -m runner --help lists the groups and their options") from None


def _compose(overrides) -> tuple[DictConfig, bool]:
    """(the composed config, whether the overrides name its run_dir), inside _hydra()."""
    from hydra import compose as hydra_compose

    cfg = hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    explicit = any(key_of(o) == "run_dir" for o in overrides)
    with open_dict(cfg):
        if not explicit:  # the command line's default, hydra.run.dir (outputs/<step>/<date>_<time>)
            cfg.run_dir = str(OmegaConf.select(cfg, "hydra.run.dir"))
        del cfg["hydra"]
    return cfg, explicit


# ------------------------------------------------------------------------------------------ the ranks' side
class Session:
    """One rank of a run whose training loop you write: use it as a context manager in the script that
    `launch(..., worker=SCRIPT)` starts on every rank (sys.argv[1] is the run directory). Every rank runs the same
    calls in the same order (they meet in collectives)."""

    def __init__(self, run_dir: str | Path):
        from runner import worker
        from runner.train.metrics import Metrics

        self.run_dir = Path(run_dir).resolve()
        self.cfg, self.dist = worker.join(self.run_dir)
        self.total_steps = int(self.cfg.runtime.total_steps)  # train.max_steps, or epochs x steps per epoch
        self.metrics = Metrics(self.run_dir, self.dist, self.cfg, self.total_steps, 0)
        self.step = 0

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:  # (an error propagates: the rank's record says failed, the launcher stops the others)
            from runner import worker

            worker.leave()  # waits for the other ranks and ends this process, as runner.worker does

    def trainer(self):
        """The method's trainer, built from the run's config: its engines (DeepSpeed), judge and data. GRPO and its
        presets (runner.stages.grpo.recipe.GRPOTask) and PPO (PPOTask): `generate_experience(rows=None)` -> a
        runner.train.onpolicy.Rollout, `train(rollout, step)` -> metrics, `evaluate()` -> held-out metrics,
        `prompts` (the tokenised prompt rows), `actor` (the policy's engine)."""
        from runner import stages

        method = stages.get(str(self.cfg.step.name))
        if not method.trainer:
            raise ConfigError(
                "step",
                f"step={method.name} has no step-by-step trainer for a loop of your own (it trains on per-batch "
                "losses in the shared loop)",
                "use step=grpo (or rloo, dr_grpo, dapo, reinforce_pp) or step=ppo, or launch without worker=",
            )
        module, _, name = method.trainer.partition(":")
        return getattr(importlib.import_module(module), name)(self.cfg, self.run_dir, self.dist)

    def log(self, step: int, values: dict, prefix: str = "train") -> None:
        """One line of metrics.jsonl (`prefix/name` keys) and the logger group's tracker, on rank 0."""
        self.metrics.log(step, values, prefix=prefix)
        if prefix == "train" and step > self.step:
            self.metrics.advance(step - self.step)
            self.step = step

    def finish(self, trainer, **summary) -> dict:
        """The end of the run: the trainer's exports (unless train.export=false) and summary.json (the trainer's
        summary keys, the steps done and `summary`); the driver records the run as completed."""
        from runner.train import lifecycle

        exports = trainer.export(self.run_dir) if self.cfg.train.export else {}
        out = {
            "stage": str(self.cfg.step.name),
            "steps": self.step,
            "world_size": self.dist.world,
            "loop": "custom (runner.api.Session)",
            **trainer.summary(),
            **{k: str(v) for k, v in exports.items()},
            **summary,
        }
        self.metrics.close(out)
        lifecycle.current().end("completed", step=self.step)
        return out
