"""autotune=true on the tiny model: every candidate that fits gets a short timed run in its own directory, the fastest
wins, the report and the winning recipe are written, the recipe runs, and a search started again skips its trials."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from tests.helpers import run_cli, run_dir_of, summary

pytestmark = pytest.mark.e2e


def table(md: str) -> list[dict]:
    rows = []
    for line in md.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 8 and cells[0][:2].isdigit():
            rows.append({"point": cells[0], "overrides": cells[1].strip("`"), "status": cells[5], "tps": cells[6]})
    return rows


def test_autotune_sft_picks_the_fastest_and_its_recipe_runs(tmp_path):
    search = ["autotune=true", "tune.zero=[stage0,stage2]", "tune.micro_batch_sizes=[8]", "tune.steps=4"]
    proc = run_cli(tmp_path, *search, "tune.dir=tune")
    root = tmp_path / "tune"
    rows = table((root / "autotune.md").read_text())
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows), proc.stdout
    speeds = {r["point"].split()[0]: float(r["tps"].replace(",", "")) for r in rows}
    best = next(r for r in rows if "(best)" in r["point"])
    assert speeds[best["point"].split()[0]] == max(speeds.values())
    for point in speeds:  # each trial is a real run of its own, with its candidate's settings
        ds = json.loads((root / point / "ds_config.json").read_text())
        assert summary(root / point)["steps"] == 4 and ds["train_batch_size"] == 8
    assert (root / "autotune.png").stat().st_size > 1000

    command = re.search(r"^the fastest configuration: (.+)$", proc.stdout, re.MULTILINE).group(1)
    args = shlex.split(command)[3:]  # after `python -m runner`
    assert args[0] == "--config-dir" and (root / "recipe" / "autotuned.yaml").is_file()
    rerun = run_cli(tmp_path, *args, "train.max_steps=3", "train.eval_every=0", "train.export=false")
    config = (run_dir_of(rerun) / "config.yaml").read_text()
    winner = dict(o.split("=", 1) for o in best["overrides"].split())
    assert f"micro_batch_size: {winner['train.micro_batch_size']}" in config
    assert json.loads((run_dir_of(rerun) / "ds_config.json").read_text())["zero_optimization"]["stage"] == int(
        winner["zero"][-1]
    )

    before = {p: (root / p / "metrics.jsonl").stat().st_mtime for p in speeds}
    again = run_cli(tmp_path, *search, "tune.dir=tune")
    assert {p: (root / p / "metrics.jsonl").stat().st_mtime for p in speeds} == before  # finished trials are kept
    assert "the fastest configuration" in again.stdout


@pytest.mark.slow
def test_autotune_ppo_tunes_actor_and_critic_together(tmp_path, sft_run, reward_run):
    proc = run_cli(
        tmp_path,
        "step=ppo",
        f"step.actor_from={sft_run / 'export'}",
        f"step.critic_from={reward_run / 'export'}",
        "step.max_prompt_len=16",
        "step.generation.max_new_tokens=8",
        "step.generation_batch_size=8",
        "autotune=true",
        "tune.zero=[stage0,stage3]",
        "tune.micro_batch_sizes=[4,8]",
        "tune.steps=3",
        "tune.dir=tune",
        check=False,
    )
    rows = table((tmp_path / "tune" / "autotune.md").read_text())
    assert len(rows) == 4
    assert all("zero@step.actor.zero=" in r["overrides"] and "zero@step.critic.zero=" in r["overrides"] for r in rows)
    # micro-batches of a step's 8 answers, each with the accumulation that keeps an optimizer step inside one step
    assert all(r["status"] == "completed" for r in rows), (tmp_path / "tune" / "autotune.md").read_text()
    assert {r["overrides"].split("train.")[1:][1] for r in rows if "micro_batch_size=8" in r["overrides"]} == {
        "gradient_accumulation_steps=1"
    }
    assert proc.returncode == 0 and any("(best)" in r["point"] for r in rows), proc.stdout + proc.stderr
