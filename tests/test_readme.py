"""The README's `python -m runner ...` commands run as written: each is planned (dry_run=true appended; an earlier
run's export replaced by a stand-in export of the tiny model, a user's data file by a file with those columns), and
a command that is bad input would exit 2. Commands that train (recipes, the default run) are planned here and run
for real by the end-to-end tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO, fake_exports, write_jsonl

SKIP = ("[more key=value overrides]",)  # a resume= example with a placeholder for the user's own overrides


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("python -m runner ") and not any(s in line for s in SKIP):
                commands.append(line)
    return commands


def test_the_readme_has_commands():
    assert len(readme_commands()) > 15


def _plan(command: str, cwd, actor, reward) -> subprocess.CompletedProcess:
    """One README command as the test runs it: stand-ins swapped in, dry_run=true appended (a tool's --help)."""
    data = write_jsonl(cwd / "pairs.jsonl", [{"question": "q", "chosen": "a", "rejected": "b"}] * 50)
    swaps = {
        "outputs/reward/<run>/export": str(reward),
        "outputs/sft/<run>/export": str(actor),
        "outputs/rlhf/<time>/sft/export": str(actor),
        "outputs/rlhf/<time>/ppo/export": str(actor),
        "step.init_from=...": f"step.init_from={actor}",
        "/data/pairs.jsonl": str(data),
    }
    for old, new in swaps.items():
        command = command.replace(old, new)
    args = __import__("shlex").split(command)[3:]
    module = args[0] if args and args[0].startswith("runner.") else None
    if module:  # runner.chat / runner.report / runner.pbt: their --help runs
        args = [module.split(".", 1)[1], "--help"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NNODES": "2"}
    if "deployment=slurm" not in command:
        env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    if "hparams_search=" in command:  # (an Optuna search plans each trial it samples: two show that it runs)
        args.append("hydra.sweeper.n_trials=2")
    cmd = [sys.executable, "-m", module or "runner", *(["--help"] if module else [*args, "dry_run=true"])]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> dict:
    """Every README command planned once, two at a time (each a single-threaded driver: the two cores are used), each
    in a directory of its own: command -> (its process, its directory)."""
    from concurrent.futures import ThreadPoolExecutor

    actor, reward = fake_exports()
    commands = list(dict.fromkeys(readme_commands()))
    dirs = [tmp_path_factory.mktemp("readme") for _ in commands]
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(lambda c, d: _plan(c, d, actor, reward), commands, dirs))
    return {c: (p, d) for c, p, d in zip(commands, procs, dirs)}


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_plans(command, planned):
    proc, cwd = planned[command]
    if "deployment=slurm" in command and not __import__("shutil").which("srun"):  # (not a SLURM machine)
        assert proc.returncode == 2 and "srun is not on this machine" in proc.stderr, proc.stderr[-2000:]
        return
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert not list(cwd.rglob("metrics.jsonl")) and not list(cwd.rglob("checkpoints"))  # nothing trained
