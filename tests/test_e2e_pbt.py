"""Population-based training on the tiny model (python -m runner.pbt): 4 SFT members with different learning rates,
2 generations; the worst member copies the best one's checkpoint and learning rate (perturbed) and resumes from it;
the report shows the lineage and the objective curves."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.slow
def test_a_four_member_population_exploits_and_reports_its_lineage(tmp_path):
    out = tmp_path / "pop"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner.pbt",
            "--population=4",
            "--interval=6",
            "--generations=2",
            "--init=optimizer.lr=1e-4,1e-3,3e-3,1e-5",
            "--explore=optimizer.lr=0.8,1.25",
            f"--dir={out}",
            "train.eval_max_batches=2",
            "train.log_every=3",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    history = json.loads((out / "pbt.json").read_text())
    assert [g["step"] for g in history] == [6, 12] and history[0]["objective_name"] == "loss"
    first = history[0]["members"]
    copies = {m["member"]: m["copies"] for m in first if m["copies"] is not None}
    assert len(copies) == 1  # the worst quarter of 4: one member exploits
    ((loser, winner),) = copies.items()
    assert first[loser]["objective"] == max(m["objective"] for m in first)  # the worst loss copies
    assert first[winner]["objective"] == min(m["objective"] for m in first)  # the best
    lr = history[1]["members"][loser]["optimizer.lr"]
    assert lr == pytest.approx(first[winner]["optimizer.lr"] * 0.8) or lr == pytest.approx(
        first[winner]["optimizer.lr"] * 1.25
    )
    # the loser resumed from the winner's step-6 checkpoint: its second-generation loss is near the winner's
    second = history[1]["members"][loser]["objective"]
    assert second < (first[loser]["objective"] + first[winner]["objective"]) / 2, (first, second)
    loser_dir = out / f"member_{loser}"
    status = json.loads((loser_dir / "status.json").read_text())
    assert status["status"] == "completed" and (loser_dir / "export").is_dir()
    assert "member_" in (out / "pbt.md").read_text() and (out / "objective.png").stat().st_size > 1000
