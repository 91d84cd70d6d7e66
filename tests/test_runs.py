"""runner ls / show / compare (runner/runs.py) on run directories as the runner writes them."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml


def make_run(root, name, stage, lr, loss, gain=None, when="2026-11-30 10:00:00"):
    run = root / name
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"status": "completed", "time": when}))
    (run / "config.yaml").write_text(yaml.safe_dump({"step": {"name": stage}}))
    (run / "overrides.yaml").write_text(yaml.safe_dump([f"step={stage}", f"optimizer.lr={lr}", "zero=stage2"]))
    summary = {"steps": 40, "objective_name": "loss", "objective": loss}
    if gain is not None:
        summary |= {"eval_reward_initial": 1.0, "eval_reward_final": 1.0 + gain, "eval_reward_gain": gain}
    (run / "summary.json").write_text(json.dumps(summary))
    rows = [{"step": s, "train/loss": loss + 1 / s} for s in range(1, 6)] + [{"step": 5, "eval/loss": loss}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def runner(*args, cwd):
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=cwd, capture_output=True, text=True)


def test_ls_show_and_compare(tmp_path):
    a = make_run(tmp_path / "outputs", "sft/a", "sft", 1e-4, 2.5, when="2026-11-30 10:00:00")
    b = make_run(tmp_path / "outputs", "dpo/b", "dpo", 5e-4, 2.1, gain=0.3, when="2026-11-30 11:00:00")
    listing = runner("ls", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split()[:3] == ["stage", "status", "started"] and len(lines) == 3
    assert lines[1].startswith("sft ") and "loss 2.5" in lines[1] and lines[1].endswith("outputs/sft/a")  # oldest first
    assert lines[2].startswith("dpo ") and "+0.300" in lines[2]
    shown = runner("show", str(b), cwd=tmp_path).stdout
    assert "command: python -m runner step=dpo optimizer.lr=0.0005 zero=stage2" in shown
    assert "eval_reward_gain: 0.3" in shown and "status: completed" in shown
    compared = runner("compare", str(a), str(b), "--out", str(tmp_path / "c.png"), cwd=tmp_path)
    head, first, second = compared.stdout.splitlines()[:3]
    assert "optimizer.lr" in head and "step" in head and "zero" not in head  # only what differs
    assert first.split()[:3] == ["a", "0.0001", "sft"] and "2.5" in first
    assert (tmp_path / "c.png").stat().st_size > 5000
    bad = runner("show", str(tmp_path), cwd=tmp_path)
    assert bad.returncode == 2 and "not a run directory" in bad.stderr and "Traceback" not in bad.stderr
