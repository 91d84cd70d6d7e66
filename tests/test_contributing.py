"""CONTRIBUTING.md's worked example, built from the guide itself: its three files added to a copy of the tree (and
no other file touched) make a method that plans, trains through the real launcher, learns and exports."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO, metrics, run_cli, run_dir_of, summary

pytestmark = pytest.mark.e2e


def guide_files() -> dict[str, str]:
    """The files the guide's method example creates: a `path` line in backticks, then a fenced block."""
    text = (REPO / "CONTRIBUTING.md").read_text()
    section = text.split("## How to add a method", 1)[1].split("## How to add a data set", 1)[0]
    blocks = re.findall(r"^`([\w/.]+)`\n\n```\w*\n(.*?)^```", section, re.S | re.M)
    return dict(blocks)


def test_the_guide_names_three_new_files_and_nothing_else():
    files = guide_files()
    assert sorted(files) == [
        "conf/step/unlikelihood.yaml",
        "runner/stages/unlikelihood/__init__.py",
        "runner/stages/unlikelihood/recipe.py",
    ]
    assert not any((REPO / f).exists() for f in files)  # the example is not part of the tree


def test_the_guides_method_plans_trains_and_exports(tmp_path):
    tree = tmp_path / "tree"
    for part in ("runner", "conf", "recipes"):
        shutil.copytree(REPO / part, tree / part, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name, body in guide_files().items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(body)
    listed = subprocess.run(
        [sys.executable, "-c", "from runner import stages; print(stages.names())"],
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "unlikelihood" in listed.stdout
    plan = run_cli(tree, "step=unlikelihood", "dry_run=true")
    assert "unlikelihood" in plan.stdout
    run = run_dir_of(run_cli(tree, "step=unlikelihood", "debug=quick", "step.alpha=0.5"))
    nll = metrics(run, "train/nll")
    assert nll[40] < 0.6 * nll[5], nll
    s = summary(run)
    assert s["stage"] == "unlikelihood" and s["objective_name"] == "nll" and (run / "export" / "config.json").exists()
    assert s["best"]["nll"] is not None and (run / "checkpoints" / "best").is_dir()
