"""Sweeps (failed and invalid points recorded, finished points skipped, the report) and a real two-node run on
this one machine: two torchrun agents sharing a rendezvous on 127.0.0.1 train one model together."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import pytest

from runner.driver.launch import free_port
from tests.helpers import QUICK, metrics, run_cli, summary

pytestmark = pytest.mark.e2e
SHORT = ["train.max_steps=12", "train.log_every=3", "train.eval_max_batches=2"]


def test_sweep_records_every_point_skips_finished_ones_and_reports(tmp_path):
    args = ["-m", "zero=stage0,stage2", "precision=fp32,fp16", "sweep_name=s", *SHORT]
    first = run_cli(tmp_path, *args, check=False)
    assert first.returncode == 1 and "2 of 4 sweep points did not complete" in first.stderr  # after every point ran
    sweep = tmp_path / "outputs" / "multirun" / "s"
    statuses = {p.name: json.loads((p / "status.json").read_text()) for p in sweep.iterdir() if p.is_dir()}
    assert sorted(s["status"] for s in statuses.values()) == ["completed", "completed", "invalid", "invalid"]
    assert all("fp16 is not supported" in s["reason"] for s in statuses.values() if s["status"] == "invalid")
    rows = list(csv.DictReader(open(sweep / "report.csv")))
    assert len(rows) == 4 and {r["zero"] for r in rows} == {"0", "2"}
    done = [r for r in rows if r["status"] == "completed"]
    assert all(
        float(r["tokens_per_s"]) > 0 and float(r["peak_mem_mb_per_rank"]) > 0 and r["metric"] == "loss" for r in done
    )
    assert (sweep / "report.md").read_text().count("| completed |") == 2
    assert (sweep / "throughput.png").stat().st_size > 1000 and (sweep / "memory.png").exists()
    assert "sweep report:" in first.stdout

    stamp = {p.name: (p / "summary.json").stat().st_mtime_ns for p in sweep.iterdir() if (p / "summary.json").exists()}
    again = run_cli(tmp_path, *args, check=False)
    assert again.stdout.count("skipped:") == 2  # finished points are not run again; invalid ones are retried
    assert stamp == {
        p.name: (p / "summary.json").stat().st_mtime_ns for p in sweep.iterdir() if (p / "summary.json").exists()
    }
    (sweep / "report.md").unlink()
    regenerated = subprocess.run([sys.executable, "-m", "runner.report", str(sweep)], capture_output=True, text=True)
    assert regenerated.returncode == 0 and (sweep / "report.md").exists()


def test_failed_point_is_recorded_and_the_sweep_goes_on(tmp_path):
    # point 1's model passes planning (config, tokenizer, a weights file whose header reads) but its weights are
    # truncated: a crash inside the launched job
    import shutil

    from tests.helpers import fake_exports

    corrupt = tmp_path / "corrupt"
    shutil.copytree(fake_exports()[0], corrupt)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    (corrupt / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)  # its data is missing
    proc = run_cli(tmp_path, "-m", f"model.path=null,{corrupt}", "sweep_name=f", *SHORT, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]  # every point ran, the report is written, and the exit says so
    assert "1 of 2 sweep points did not complete: 1 (failed)" in proc.stderr
    points = sorted((tmp_path / "outputs" / "multirun" / "f").glob("*/status.json"))
    statuses = [json.loads(p.read_text()) for p in points]
    assert [s["status"] for s in statuses] == ["completed", "failed"]
    assert statuses[1]["reason"].startswith("exit code") and "rank 0 failed" in statuses[1]["reason"]
    assert (points[1].parent / "launch.log").stat().st_size > 0
    assert (tmp_path / "outputs" / "multirun" / "f" / "report.md").exists()


def test_planned_sweep_estimates_memory_per_point(tmp_path):
    run_cli(
        tmp_path,
        "-m",
        "dry_run=true",
        "model=opt-1.3b",
        "deployment=single_node",
        "zero=stage2,stage3",
        "train.micro_batch_size=1,2",
        "sweep_name=p",
    )
    plan = (tmp_path / "outputs" / "multirun" / "p" / "plan.md").read_text()
    rows = [line for line in plan.splitlines() if line.startswith("| ") and "ZeRO" not in line]
    assert len(rows) == 4
    per_device = {(r.split("|")[2].strip(), r.split("|")[3].strip()): float(r.split("|")[5]) for r in rows}
    assert per_device[("3", "1")] < per_device[("2", "1")]  # ZeRO-3 needs less per device than ZeRO-2
    assert per_device[("2", "2")] > per_device[("2", "1")]  # activations grow with the micro-batch
    assert all(v in plan for v in ("fits", "est. tokens/s"))


def test_two_nodes_on_one_machine_match_a_single_node(tmp_path, sft_runs):
    single = sft_runs("stage2", ranks=2)  # one node, two ranks, 4 samples each per step
    common = ["zero=stage2", "train.micro_batch_size=4", "deployment.threads_per_rank=1", *QUICK]

    two = tmp_path / "two_nodes"
    port = free_port()
    node0 = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runner",
            "deployment=torchrun",
            "deployment.nnodes=2",
            "deployment.nproc_per_node=1",
            f"deployment.rdzv_endpoint=127.0.0.1:{port}",
            f"run_dir={two}",
            *common,
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    for _ in range(600):  # node 1 runs the command node 0 wrote, as a second machine would
        if (two / "launch.sh").exists() or node0.poll() is not None:
            break
        time.sleep(0.1)
    launch = (two / "launch.sh").read_text()
    assert "torchrun --nnodes 2 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:" in launch
    node1 = subprocess.run(["bash", str(two / "launch.sh")], capture_output=True, text=True, timeout=600)
    out0, _ = node0.communicate(timeout=600)
    assert node0.returncode == 0 and node1.returncode == 0, out0[-3000:] + node1.stdout[-2000:] + node1.stderr[-2000:]

    s = summary(two)
    assert s["world_size"] == 2 and len(s["peak_memory_mb"]) == 2  # both nodes took part
    a, b = metrics(single, "train/loss"), metrics(two, "train/loss")
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a[step], b[step])
    assert summary(two)["eval_loss"] == pytest.approx(summary(single)["eval_loss"], rel=1e-4)
