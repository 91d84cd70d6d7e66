"""Nothing lost, nothing silent, in process: checkpoint commits and the fallback to the newest complete one, run
directories claimed for one run, status history, keys added with `+` that nothing reads, raw DeepSpeed keys the
chosen stage would ignore, the trackers' mode, secrets on Hydra's console, failure diagnosis, and which resumes onto
another layout are refused before anything is written."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner import manifest
from runner.driver import ds_check, keys, resume, rundir, supervise
from runner.driver.plan import make_plan
from runner.errors import ConfigError
from runner.overrides import RedactFilter
from runner.train.trackers import wandb_mode
from tests.helpers import CPU, GPU


# ------------------------------------------------------------------------------------------------ checkpoints
def fake_checkpoint(ckpt, tag: str, step: int, commit: bool = True, others=("critic",)):
    for folder in [ckpt / tag] + [ckpt / o / tag for o in others]:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(os.urandom(64))
    (ckpt / tag / "rank0.pt").write_bytes(b"rng")
    if commit:
        manifest.commit(ckpt, tag, step, list(others))


def test_a_checkpoint_counts_only_once_committed_and_resume_falls_back(tmp_path):
    ckpt = tmp_path / "checkpoints"
    fake_checkpoint(ckpt, "step10", 10)
    assert (ckpt / "latest").read_text() == "step10" and (ckpt / "critic" / "latest").read_text() == "step10"
    fake_checkpoint(ckpt, "step20", 20, commit=False)  # the rank died before the commit
    assert manifest.resume_point(tmp_path) == ("step10", [])  # `latest` still names the complete one
    (ckpt / "latest").write_text("step20")  # (an older runner wrote `latest` first: it must not be trusted)
    tag, notes = manifest.resume_point(tmp_path)
    assert tag == "step10" and any("names step20, which is incomplete" in n for n in notes)
    (ckpt / "latest").write_text("")
    assert manifest.resume_point(tmp_path)[0] == "step10"
    (ckpt / "step10" / "rank0.pt").write_bytes(b"")  # a file cut short: the checkpoint no longer verifies
    assert manifest.resume_point(tmp_path)[0] is None and not manifest.is_complete(ckpt, "step10")


def test_write_atomic_leaves_the_old_or_the_new(tmp_path):
    path = tmp_path / "latest"
    manifest.write_atomic(path, "step10")
    manifest.write_atomic(path, "step20")
    assert path.read_text() == "step20" and [p.name for p in tmp_path.iterdir()] == ["latest"]


# ------------------------------------------------------------------------------------------------ run directories
def test_a_run_never_writes_into_another_runs_directory(tmp_path):
    first = tmp_path / "2026-01-01_00-00-00"
    assert rundir.claim(first, explicit=False, resume=False) == first
    (first / "config.yaml").write_text("a run")
    second = rundir.claim(first, explicit=False, resume=False)  # started in the same second
    assert second == tmp_path / "2026-01-01_00-00-00-2"
    with pytest.raises(ConfigError) as err:
        rundir.claim(first, explicit=True, resume=False)  # run_dir= naming another run's directory
    assert err.value.where == "run_dir" and "resume=" in err.value.fix
    rundir.release(first)
    assert rundir.claim(first, explicit=True, resume=True) == first  # resuming it is what resume= is for


def test_a_dead_runs_lock_is_taken_over_and_a_live_one_is_not(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / rundir.LOCK).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    assert rundir.claim(run, explicit=True, resume=True) == run
    rundir.release(run)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (run / rundir.LOCK).write_text(json.dumps({"pid": live.pid, "host": os.uname().nodename}))
        with pytest.raises(ConfigError) as err:
            rundir.claim(run, explicit=True, resume=True)
        assert "in use by a running run" in err.value.problem
    finally:
        live.kill()


def test_status_keeps_earlier_attempts(tmp_path):
    rundir.write_status(tmp_path, "completed", ["a=1"])
    rundir.write_status(tmp_path, "running", ["a=1"])
    rundir.write_status(tmp_path, "failed", ["a=1"], reason="rank 1 failed")
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "failed" and [h["status"] for h in status["history"]] == ["completed"]


# ------------------------------------------------------------------------------------------------ keys
@pytest.mark.parametrize(
    "override, where, near",
    [
        ("+train.lr=1e-5", "train.lr", "optimizer.lr"),
        ("+optimiser=adamw", "optimiser", "optimizer"),
        ("+step.kl_coef=0.1", "step.kl_coef", None),
    ],
)
def test_a_key_added_with_plus_must_be_read_by_something(compose, override, where, near):
    cfg = compose([override])
    with pytest.raises(ConfigError) as err:
        keys.check_added(cfg, [override])
    assert err.value.where == where and (near is None or near in err.value.fix)


@pytest.mark.parametrize(
    "override",
    [
        "+ds.zero_optimization.reduce_bucket_size=5e8",
        "+zero.round_robin_gradients=true",
        "+data.sets.tiny.fields.answer=response",
        "+logger.api_key=x",
    ],
)
def test_free_form_places_take_added_keys(compose, override):
    keys.check_added(compose([override]), [override])


# ------------------------------------------------------------------------------------------------ DeepSpeed JSON
def ds(zero: dict, **extra) -> dict:
    return {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        **extra,
    }


@pytest.mark.parametrize(
    "config, accelerator, where",
    [
        (ds({"stage": 0}, fp16={"enabled": True}, bf16={"enabled": True}), "cuda", "ds"),
        (ds({"stage": 0}, fp16={"enabled": True}), "cpu", "ds.fp16"),
        (ds({"stage": 2, "stage3_max_live_parameters": 5}), "cuda", "zero.stage3_max_live_parameters"),
        (ds({"stage": 1, "offload_param": {"device": "cpu"}}), "cuda", "zero.offload_param"),
        (ds({"stage": 0, "offload_optimizer": {"device": "cpu"}}), "cuda", "zero.offload_optimizer"),
    ],
)
def test_runner_rules_on_the_final_json(config, accelerator, where):
    with pytest.raises(ConfigError) as err:
        ds_check.rules({"": config}, accelerator)
    assert err.value.where == where


def test_deepspeeds_parser_checks_raw_keys():
    ds_check.deepspeed_parse({"": ds({"stage": 2})})
    with pytest.raises(ConfigError) as err:
        ds_check.deepspeed_parse({"": ds({"stage": 2}, gradient_clippin=1.0)})
    assert err.value.where == "ds.gradient_clippin" and "gradient_clipping" in err.value.fix
    with pytest.raises(ConfigError) as err:
        ds_check.deepspeed_parse({"": ds({"stage": 2, "overlap_comm": "sometimes"})})
    assert err.value.where == "ds" and "overlap_comm" in err.value.problem


# ------------------------------------------------------------------------------------------------ logging
def test_the_users_wandb_mode_wins(compose, monkeypatch):
    cfg = compose(["logger=wandb"])
    monkeypatch.setenv("WANDB_API_KEY", "k")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode(cfg) == "offline"
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode(cfg) == "online"


def test_secrets_never_reach_hydras_console():
    record = logging.LogRecord(
        "hydra", logging.INFO, "", 0, "\t#0 : zero=stage0 +logger.api_key=sk-123 token='a b'", (), None
    )
    RedactFilter().filter(record)
    assert record.getMessage() == "\t#0 : zero=stage0 +logger.api_key=<redacted> token=<redacted>"


# ------------------------------------------------------------------------------------------------ failures
def ranks(tmp_path, *records):
    (tmp_path / "ranks").mkdir()
    for i, r in enumerate(records):
        (tmp_path / "ranks" / f"{i}.json").write_text(json.dumps({"rank": i, "pid": 100 + i, "host": "h", **r}))


def test_a_killed_rank_is_named_with_its_signal(tmp_path):
    ranks(tmp_path, {"state": "failed", "error": "RuntimeError: Connection reset by peer"}, {"state": "running"})
    reason = supervise.diagnose(tmp_path, "RuntimeError: Connection reset by peer", [-9])
    assert reason.startswith("rank 1 (pid 101 on h) was killed by SIGKILL")


def test_a_ranks_own_error_comes_before_its_peers_lost_connection(tmp_path):
    ranks(
        tmp_path,
        {"state": "failed", "error": "RuntimeError: Connection reset by peer"},
        {"state": "failed", "error": "torch.OutOfMemoryError: CUDA out of memory"},
    )
    assert supervise.diagnose(tmp_path, "", [1]) == "rank 1 failed: torch.OutOfMemoryError: CUDA out of memory"


# ------------------------------------------------------------------------------------------------ resume layouts
def saved_run(tmp_path, stage: int, world: int, others=()):
    run = tmp_path / f"run{stage}{world}"
    fake_checkpoint(run / "checkpoints", "step20", 20, others=others)
    config = ds({"stage": stage})
    config.update(train_batch_size=8, train_micro_batch_size_per_gpu=8 // world)
    (run / "ds_config.json").write_text(json.dumps(config))
    return run


def layout(stage: int, world: int) -> dict:
    return {"": {**ds({"stage": stage}), "train_batch_size": 8, "train_micro_batch_size_per_gpu": 8 // world}}


@pytest.mark.parametrize(
    "was, now, convert",
    [((3, 2), (2, 1), {"": True}), ((2, 1), (2, 2), {"": True}), ((0, 1), (0, 2), {"": False}), ((1, 2), (1, 2), {})],
)
def test_layouts_a_resume_can_load(tmp_path, was, now, convert):
    tag, step, got, notes = resume.plan(saved_run(tmp_path, *was, others=()), layout(*now), [""], False)
    assert (tag, step, got) == ("step20", 20, convert)


@pytest.mark.parametrize(
    "was, now, has_rank_state, why",
    [
        ((0, 1), (2, 1), False, "ZeRO-0 keeps the optimizer state"),
        ((2, 1), (3, 2), False, "at stage 1 or 2 only"),
        ((3, 2), (3, 1), True, "per-rank state"),
    ],
)
def test_layouts_a_resume_cannot_load_are_refused(tmp_path, was, now, has_rank_state, why):
    with pytest.raises(ConfigError) as err:
        resume.plan(saved_run(tmp_path, *was, others=()), layout(*now), [""], has_rank_state)
    assert why in err.value.problem


def test_a_resume_with_another_global_batch_is_refused(tmp_path):
    other = {"": {**layout(0, 1)[""], "train_batch_size": 16, "train_micro_batch_size_per_gpu": 16}}
    with pytest.raises(ConfigError) as err:
        resume.plan(saved_run(tmp_path, 0, 1, others=()), other, [""], False)
    assert "train.global_batch_size=8" in err.value.fix


# ------------------------------------------------------------------------------------------------ the model named
def test_a_local_model_brings_its_own_tokenizer_and_architecture(compose, tmp_path):
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from tests.helpers import TINY_TOKENIZER

    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    tok.add_tokens([f"<extra{i}>" for i in range(52)])  # 1,076 tokens
    model_dir = tmp_path / "mine"
    OPTForCausalLM(
        OPTConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            ffn_dim=64,
            word_embed_proj_dim=32,
            max_position_embeddings=128,
        )
    ).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    plan = make_plan(compose([f"model.path={model_dir}"]), CPU)
    model = plan.cfg.model
    assert model.tokenizer == str(model_dir) and model.arch.vocab_size == 1076
    assert model.arch.max_position_embeddings == 128 and plan.cfg.data.max_seq_len == 128
    assert model.num_params is None  # counted from this architecture, not the tiny preset's
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ConfigError) as err:
        make_plan(compose([f"model.path={model_dir}"]), CPU)
    assert err.value.where == "model.path" and "no weights" in err.value.problem


def test_a_hub_model_that_is_not_cached_names_model_path(compose, hf_offline):
    from runner import modeling

    cfg = make_plan(compose(["model=opt-125m", "dry_run=true", "deployment=single_gpu"]), GPU).cfg
    with pytest.raises(ConfigError) as err:
        modeling.load_tokenizer(cfg.model)
    assert "model.path" in err.value.fix and "cache" in err.value.fix


def test_a_stop_signal_reaches_the_ranks_and_then_submitits_requeue(tmp_path):
    """Under SLURM, submitit's handler for the job's timeout signal (SIGUSR2) requeues the job; the driver first has
    the ranks stop with a checkpoint (the STOP file), then calls it."""
    import signal
    import threading

    called = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: called.append(signum))
    stop = str(tmp_path / "STOP")
    wait = f"import os, time\nwhile not os.path.exists({stop!r}): time.sleep(0.05)\nprint('stopped')"
    ranks = [sys.executable, "-c", wait]
    try:
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGUSR2)).start()
        outcome = supervise.launch(ranks, {**os.environ}, tmp_path, "=== test")
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert outcome.rc == 0 and outcome.stop_requested == "SIGUSR2" and called == [signal.SIGUSR2]
    assert "stopped" in (tmp_path / "launch.log").read_text() and not (tmp_path / "STOP").exists()


def test_sweep_report_ranks_points_by_their_heldout_metric(tmp_path):
    """A DPO sweep over beta: the report's rows carry each point's held-out accuracy and judged reward gain, and it
    names the best point by each."""
    from runner import report

    for i, (beta, acc, gain) in enumerate([(0.05, 0.81, 0.30), (0.1, 0.88, 0.12), (0.5, 0.86, -0.05)]):
        point = tmp_path / str(i)
        point.mkdir()
        overrides = ["step=dpo", f"step.beta={beta}"]
        (point / "status.json").write_text(json.dumps({"status": "completed", "overrides": overrides}))
        s = {"objective_name": "accuracy", "objective": acc, "eval_reward_gain": gain}
        (point / "summary.json").write_text(json.dumps(s))
    text = report.write(tmp_path).read_text()
    assert "best accuracy: 0.88 at point 1 (`step=dpo step.beta=0.1`)" in text
    assert "best held-out reward gain: +0.3 at point 0" in text
    rows = list(csv.DictReader(open(tmp_path / "report.csv")))
    assert [(r["metric"], r["value"], r["reward_gain"]) for r in rows][2] == ("accuracy", "0.86", "-0.05")


def test_sweep_report_plots_one_line_per_estimator(tmp_path):
    """A GRPO sweep over step.rollout.n and the estimator: the plots' x axis is rollout.n and each estimator is a
    line (the micro-batch size does not vary); the reward gain gets a plot of its own."""
    from runner import report

    points = [(adv, n, 0.1 * n + (0.2 if adv == "rloo" else 0.0)) for adv in ("grpo", "rloo") for n in (2, 4, 8)]
    for i, (adv, n, gain) in enumerate(points):
        point = tmp_path / str(i)
        point.mkdir()
        overrides = ["step=grpo", f"step.advantage={adv}", f"step.rollout.n={n}"]
        (point / "status.json").write_text(json.dumps({"status": "completed", "overrides": overrides}))
        s = {"objective_name": "reward_mean", "objective": gain, "eval_reward_gain": gain, "advantage": adv}
        (point / "summary.json").write_text(json.dumps(s))
    rows = report.collect(tmp_path)
    assert report.axes(rows) == ("override:step.rollout.n", "step.rollout.n", "estimator")
    text = report.write(tmp_path).read_text()
    assert "![reward_gain.png](reward_gain.png)" in text and (tmp_path / "reward_gain.png").stat().st_size > 1000
    assert [r["estimator"] for r in csv.DictReader(open(tmp_path / "report.csv"))] == ["grpo"] * 3 + ["rloo"] * 3
    # a ZeRO x micro-batch sweep keeps its axes
    zero_rows = [{"micro_batch": m, "zero": z, "overrides": ""} for z in (0, 3) for m in (1, 2)]
    assert report.axes(zero_rows) == ("micro_batch", "micro-batch size per device", "zero")


def test_sweep_plots_have_titles_labelled_axes_from_zero_and_mark_a_throughput_from_few_steps(tmp_path):
    """Two points of a micro-batch sweep: one trained 100 steps, one 10 (its throughput is one interval after the
    start-up one: too few steps to trust, marked in the table, the report and the plot)."""
    from runner import report

    for i, (micro, steps, gain) in enumerate([(2, 100, 0.2), (4, 10, -0.1)]):
        point = tmp_path / str(i)
        point.mkdir()
        overrides = [f"train.micro_batch_size={micro}"]
        (point / "status.json").write_text(json.dumps({"status": "completed", "overrides": overrides}))
        train = [
            {"step": s, "train/tokens_per_s": 1000.0 * micro + s, "train/peak_memory_mb": [100.0 * micro]}
            for s in range(5, steps + 1, 5)
        ]
        (point / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
        s = {"objective_name": "reward_mean", "objective": 1.0, "eval_reward_gain": gain}
        (point / "summary.json").write_text(json.dumps(s))
    text = report.write(tmp_path).read_text()
    rows = list(csv.DictReader(open(tmp_path / "report.csv")))
    assert [r["throughput_steps"] for r in rows] == ["95", "5"]
    assert float(rows[0]["tokens_per_s"]) == 2000 + 55  # the median of the intervals after the first (10..100)
    assert "| 4010 (few steps) |" in text and "(few steps)" not in text.split("| 4010")[0]
    assert f"throughput of point 1 is measured over fewer than {report.MIN_THROUGHPUT_STEPS} steps" in text
    for key, ylabel, name, title in report.PLOTS:
        fig = report.figure(report.collect(tmp_path), key, ylabel, title)
        ax = fig.axes[0]
        assert ax.get_title() == title and ax.get_ylabel() == ylabel
        assert ax.get_xlabel() == "micro-batch size per device"
        low, high = ax.get_ylim()
        assert low == 0 if key != "reward_gain" else low < -0.1 < 0 < 0.2 < high  # from zero, or spanning it
        hollow = [line for line in ax.lines if line.get_markerfacecolor() == "white"]
        notes = [t.get_text() for t in fig.texts]
        if key == "tokens_per_s":
            assert len(hollow) == 1 and list(hollow[0].get_xdata()) == [4.0] and "too few to trust" in notes[0]
        else:
            assert not hollow and not notes
        assert (tmp_path / name).stat().st_size > 1000


def test_shm_release_removes_only_its_own_process_groups_buffers():
    """runner.shm: the buffers of one MASTER_PORT (any address, any rank, or one rank) go; another port's stay."""
    from runner import shm

    uid = os.getuid()
    made = [shm.SHM / f"{shm.PREFIX}_{uid}_127.0.0.1_{port}_{rank}" for port in (1, 2) for rank in (0, 1)]
    try:
        for path in made:
            path.write_bytes(b"x")
        assert shm.buffers(1) == made[:2]
        assert shm.release(1, "127.0.0.1", "1") == 1 and shm.buffers(1) == made[:1]
        assert shm.release(1) == 1 and not shm.buffers(1) and shm.buffers(2) == made[2:]
    finally:
        for path in made:
            path.unlink(missing_ok=True)


def test_the_launcher_is_found_beside_this_python_when_the_environment_is_not_activated():
    """`/path/to/.venv/bin/python -m runner` without activating the venv: `deepspeed` is not on PATH, but beside
    the interpreter; the ranks get that directory first on their PATH. A launcher found nowhere is a clean outcome."""
    import sys

    from runner.driver import supervise

    bare = {"PATH": "/usr/bin:/bin"}
    cmd, env = supervise.resolve(["deepspeed", "--num_gpus", "1"], bare)
    assert cmd == [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1"]
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert supervise.resolve(["no-such-launcher"], bare) == (None, bare)


def test_a_finished_run_leaves_curves_and_a_model_card(tmp_path):
    """runner.driver.artifacts: curves.png with a panel per logged metric, and export/README.md naming the method,
    the start, the data, the settings, the held-out results and the command."""
    import yaml

    from runner.driver import artifacts

    rows = [{"step": s, "train/loss": 3.0 / s, "train/lr": 1e-4} for s in range(1, 11)]
    rows += [{"step": 10, "eval/loss": 0.5, "eval/reward_mean": 1.2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "step": {"name": "sft", "init_from": None, "train_on_prompt": False},
        "train": {"micro_batch_size": 8, "gradient_accumulation_steps": 2},
        "model": {"name": "tiny", "path": None},
        "data": {"sets": {"tiny": {"path": "runner/assets/tiny_data"}}, "split": {"sft": 2}},
        "runtime": {"world_size": 2},
        "zero": {"stage": 3},
        "precision": {"dtype": "fp32"},
        "optimizer": {"lr": 1e-4},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "overrides.yaml").write_text(yaml.safe_dump(["zero=stage3", "data.sets.tiny.weight=0.5"]))
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("{}")
    summary = {"steps": 10, "objective_name": "loss", "objective": 0.5, "export_dir": str(tmp_path / "export")}
    summary |= {"eval_reward_initial": 1.0, "eval_reward_final": 1.2, "eval_reward_gain": 0.2, "eval_judge": "tiny"}
    assert artifacts.curves(tmp_path).stat().st_size > 5000
    card = artifacts.model_card(tmp_path, summary).read_text()
    for text in (
        "trained with sft",
        "`tiny` (runner/assets/tiny_data)",
        "10 steps on 2 rank(s), ZeRO stage 3",
        "loss: 0.5",
        "1 before training, 1.2 after (+0.2)",
        "python -m runner zero=stage3 data.sets.tiny.weight=0.5",
    ):
        assert text in card, text
    assert artifacts.model_card(tmp_path, {**summary, "export_dir": str(tmp_path / "none")}) is None
