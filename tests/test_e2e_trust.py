"""Nothing lost, end to end through the real launcher: a SIGTERM to the driver in the middle of a two-rank ZeRO-3 run
(a checkpoint at that step, `preempted`, exit 75, and a resume, on one rank at ZeRO-2, to the same losses as an
uninterrupted run), a rank killed while saving (named, and the run resumes from the newest complete checkpoint, on
two ranks instead of one), two runs started in the same second, a full disk, and a refused resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import QUICK, metrics, run_cli, summary

pytestmark = pytest.mark.e2e
TWO_ZERO3 = ["zero=stage3", "deployment=cpu", "deployment.nproc_per_node=2", "train.micro_batch_size=4"]


def status(run_dir):
    return json.loads((run_dir / "status.json").read_text())


def same_losses(a, b, steps, tol=1e-5):
    la, lb = metrics(a, "train/loss"), metrics(b, "train/loss")
    for step in steps:
        assert lb[step] == pytest.approx(la[step], rel=tol, abs=tol), (step, la[step], lb[step])
    assert metrics(b, "eval/loss")[40] == pytest.approx(metrics(a, "eval/loss")[40], rel=tol)


def test_sigterm_mid_run_preempts_with_a_checkpoint_and_resume_continues_on_another_layout(tmp_path, sft_runs):
    """A scheduler's SIGTERM to the driver of a two-rank ZeRO-3 run: a checkpoint at the step it stopped at,
    `preempted`, exit 75; resumed on one rank at ZeRO-2 (through a universal checkpoint), it ends with the losses of
    the uninterrupted two-rank ZeRO-3 run."""
    uninterrupted = sft_runs("stage3", ranks=2)
    env = {**os.environ, "RUNNER_FAULT": "term-driver:17"}  # the signal arrives as step 17 ends
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "runner", *TWO_ZERO3, *QUICK, "train.save_every=0", f"run_dir={run}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 75, proc.stderr[-3000:]
    record = status(run)
    stopped = record["step"]
    assert record["status"] == "preempted" and record["reason"] == "SIGTERM" and 17 <= stopped < 40
    assert (run / "checkpoints" / "latest").read_text() == f"step{stopped}"  # saved at the step it stopped at
    assert f"python -m runner resume={run}" in proc.stderr
    assert "terminate called" not in (run / "launch.log").read_text()  # (the ranks' exit: in the log, not the console)
    resumed = run_cli(
        tmp_path, f"resume={run}", "deployment.nproc_per_node=1", "zero=stage2", "train.micro_batch_size=8"
    )
    assert "ZeRO-3 checkpoint on 1 rank(s) at ZeRO-2 (saved on 2)" in resumed.stdout
    assert json.loads((run / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
    assert status(run)["status"] == "completed" and [h["status"] for h in status(run)["history"]] == ["preempted"]
    train_steps = [
        json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if "train/loss" in line
    ]
    assert train_steps == [5, 10, 15, 20, 25, 30, 35, 40]  # each step logged once
    same_losses(uninterrupted, run, (25, 30, 35, 40))  # (the interval ending at 20 began before the stop)


def test_a_rank_killed_while_saving_is_named_and_the_run_resumes_on_two_ranks(tmp_path, sft_run):
    run = tmp_path / "run"
    env = {**os.environ, "RUNNER_FAULT": "save:20"}  # dies after writing step 20's files, before committing them
    proc = subprocess.run(
        [sys.executable, "-m", "runner", *QUICK, "train.save_every=10", f"run_dir={run}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode != 0
    assert "rank 0 (pid" in status(run)["reason"] and "killed by SIGKILL" in status(run)["reason"]
    assert (run / "checkpoints" / "latest").read_text() == "step10" and (run / "checkpoints" / "step20").is_dir()
    resumed = run_cli(
        tmp_path, f"resume={run}", "deployment=cpu", "deployment.nproc_per_node=2", "train.micro_batch_size=4"
    )  # and onto two ranks (ZeRO-0: every rank loads everything)
    assert "resuming from checkpoint step10" in resumed.stdout
    assert summary(run)["world_size"] == 2
    same_losses(sft_run, run, (15, 20, 25, 30, 35, 40))


def test_two_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    cmd = [sys.executable, "-m", "runner", "debug=fdr", "hydra.run.dir=outputs/same"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [*cmd, f"seed={seed}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for seed in (1, 2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    dirs = {
        int(
            json.loads((d / "status.json").read_text())
            and (d / "config.yaml").read_text().split("seed: ")[1].split()[0]
        ): d
        for d in (tmp_path / "outputs").glob("same*")
    }
    assert sorted(dirs) == [1, 2] and len({str(d) for d in dirs.values()}) == 2
    for seed, d in dirs.items():
        assert f"seed={seed}" in " ".join(status(d)["overrides"]) and (d / "export" / "config.json").exists()


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small file system here ({done.stderr.decode().strip()})")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_full_disk_names_the_file_system_and_keeps_the_last_checkpoint(tmp_path, small_disk):
    run = small_disk / "run"
    proc = run_cli(tmp_path, *QUICK, "train.save_every=10", "train.keep_last=5", f"run_dir={run}", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr.split("error: the launcher")[-1]
    assert f"the file system of {run} is full" in proc.stderr
    complete = (run / "checkpoints" / "latest").read_text()
    assert f"the last complete checkpoint, {complete}, is kept" in proc.stderr
    from runner import manifest

    assert manifest.is_complete(run / "checkpoints", complete)


def test_a_refused_resume_leaves_a_finished_runs_record_untouched(tmp_path, sft_run):
    record = {
        name: (sft_run / name).read_bytes()
        for name in ("status.json", "config.yaml", "overrides.yaml", "launch.log", "ds_config.json", "metrics.jsonl")
    }
    for extra, why in ((["zero=stage2"], "ZeRO-0 keeps the optimizer state"), ([], "has done all its 40 steps")):
        proc = run_cli(tmp_path, f"resume={sft_run}", *extra, check=False)
        assert proc.returncode == 2 and why in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert {name: (sft_run / name).read_bytes() for name in record} == record


def test_a_run_killed_after_its_last_checkpoint_resumes_to_its_export(tmp_path, sft_run):
    """Killed after the last checkpoint was committed but before the export and the summary were written (found by
    bench/kill_resume.py): resume= finishes the run instead of refusing it as done."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    shutil.rmtree(run / "export")
    (run / "summary.json").unlink()
    proc = run_cli(tmp_path, f"resume={run}")
    assert "every step is done (checkpoint step40)" in proc.stdout + proc.stderr
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    assert (run / "export" / "config.json").exists() and json.loads((run / "summary.json").read_text())["steps"] == 40


def test_a_run_killed_while_its_ranks_shut_down_is_recorded_as_completed_on_resume(tmp_path, sft_run):
    """Killed after its checkpoint, export and summary were written (its status says failed: a rank died in the
    teardown): resume= launches nothing and records it as completed, with its verdict."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, "status": "failed", "reason": "rank 1 killed by SIGKILL"}))
    launches = (run / "launch.log").read_text().count("=== ")
    proc = run_cli(tmp_path, f"resume={run}")
    assert "recorded as completed" in proc.stdout and "held-out loss" in proc.stdout
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    assert (run / "launch.log").read_text().count("=== ") == launches  # nothing was launched
