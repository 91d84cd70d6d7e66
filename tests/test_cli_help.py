"""`runner --help` (conf/hydra/help/runner.yaml through Hydra's help template) and tab completion of the installed
`runner` command (Hydra's bash completion), run outside the repository as a user would."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.helpers import CONF, REPO


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra}


def _section(text: str, title: str) -> str:
    return text.split(f"== {title} ==", 1)[1].split("\n== ", 1)[0]


def test_help_opens_with_examples_and_keys_then_hydras_groups(tmp_path, compose):
    proc = subprocess.run(
        [sys.executable, "-m", "runner", "--help"], cwd=tmp_path, env=_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    order = [text.index(f"== {t} ==") for t in ("Examples", "Keys most often changed", "Configuration groups")]
    assert order == sorted(order) and order[0] < 400, text[:600]  # it opens with the examples
    assert (
        "zero: stage0, stage1, stage2, stage2_offload, stage3, stage3_offload, stage3_zeropp" in text
    )  # Hydra's groups
    assert "--shell-completion,-sc" in text and "--multirun,-m" in text  # Hydra's flags
    for line in ("runner recipe=rlhf_tiny", "runner -m ", "runner dry_run=true", "runner ls", "runner compare"):
        assert line in _section(text, "Examples"), line

    # every GROUP=OPTION named in the examples and key lines exists, and every dotted key is in the config
    cfg = compose(["step=grpo"])
    for group, option in re.findall(r"(?<![\w.+])([a-z_]+)=([\w.-]+)", text.split("== Configuration groups ==")[0]):
        if (CONF / group).is_dir() and not option.isupper() and ".." not in option:
            assert (CONF / group / f"{option}.yaml").is_file(), f"{group}={option}"
    for key in re.findall(r"^\s+(\w+\.[\w.]+)=", _section(text, "Keys most often changed"), re.M):
        assert OmegaConf.select(cfg, key, default="absent") != "absent" or key.startswith("data.sets."), key


def _install_runner(tmp_path):
    """An installed `runner` command, as pip writes it for [project.scripts], on a PATH of its own."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "runner"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom runner.__main__ import cli\nsys.exit(cli())\n")
    script.chmod(0o755)
    return _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(
    "line, expected",
    [("runner zero=", "zero=stage3"), ("runner step=grpo step.roll", "step.rollout."), ("runner train.mi", None)],
)
def test_tab_completion_of_the_installed_command(tmp_path, line, expected):
    """Hydra's bash completion, installed with `runner -sc install=bash` and asked what <TAB> after `line` offers."""
    env = _install_runner(tmp_path)
    words = line.split()
    script = (
        'eval "$(runner -sc install=bash)"\n'
        f'COMP_LINE="{line}"; COMP_POINT=${{#COMP_LINE}}; COMP_CWORD={len(words) - 1}\n'
        'hydra_bash_completion; printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    offered = proc.stdout.split()
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert (expected or "train.micro_batch_size=") in offered, (offered, proc.stderr)
    if expected == "zero=stage3":
        stages = ("stage0", "stage1", "stage2", "stage2_offload", "stage3", "stage3_offload", "stage3_zeropp")
        assert offered == [f"zero={s}" for s in stages]


def test_python_m_runner_installs_completion_for_the_runner_command(tmp_path):
    """Hydra's script completes `python FILE.py` or a command, not `python -m MODULE`: it is registered for `runner`
    (and never for `python`); the query it runs lists the options from outside the repository."""
    install = [sys.executable, "-m", "runner", "-sc", "install=bash"]
    proc = subprocess.run(install, cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("-F hydra_bash_completion runner"), proc.stdout[-300:]
    query = subprocess.run(
        [sys.executable, "-m", "runner", "-sc", "query=bash"],
        cwd=tmp_path,
        env=_env(COMP_LINE="runner zero="),
        capture_output=True,
        text=True,
    )
    assert "zero=stage3" in query.stdout.split(), query.stderr
