"""`python -m runner [overrides]`: compose, plan, write the run directory, launch the ranks.

The Hydra process is the only one that parses the command line. It validates everything it can before writing a
single file, so bad input leaves nothing behind; then it writes config.yaml, overrides.yaml, ds_config.json and
launch.sh into the run directory and starts the real launcher (deepspeed or torchrun) on `runner.worker`.
"""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from runner.driver import run as driver
from runner.errors import ConfigError

_task_started = False
# Absolute: Hydra reads a relative config_path as a Python package ("conf") when the app starts from the installed
# `runner` script, which then finds no config (and shell completion composes nothing).
CONF = Path(__file__).resolve().parent.parent / "conf"


class _HeldStderr(io.TextIOBase):
    """stderr held back until the task starts: what Hydra prints when composition fails is rewritten into one
    message (see _rewrite); once the task runs, stderr is the terminal's again."""

    def __init__(self, real):
        self.real, self.parts = real, []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def release(self) -> str:
        sys.stderr = self.real
        held, self.parts = "".join(self.parts), []
        return held


def _removed_optimizer(args: list[str]) -> str | None:
    """`optimizer=onebit_adam`, `optimizer.type=OneBitAdam`: Hydra finds no such option or key; the message says the
    optimizer was removed from DeepSpeed and what replaced it."""
    from runner.driver.optimizers import REMOVED_FIX, removed_message

    for arg in args:
        key, _, value = arg.lstrip("+~").partition("=")
        message = removed_message(value) if key in ("optimizer", "optimizer.type", "optimizer.name") else None
        if message:
            return ConfigError(key, message, REMOVED_FIX).render() + "\n"
    return None


def _rewrite(held: str, args: list[str]) -> str:
    """Hydra's composition errors as the runner's: an unknown key with the closest existing one (not Hydra's advice
    to add it with `+`), a YAML error with its file and line only (not a 70-line traceback)."""
    gone = _removed_optimizer(args)
    if gone:
        return gone
    unknown = re.search(r"Could not override '([^']+)'", held)
    if unknown:
        from runner.driver.keys import is_group_choice, unknown_key_message

        return unknown_key_message(unknown.group(1), str(CONF), [a for a in args if is_group_choice(a)]) + "\n"
    yaml_error = re.search(r"yaml\.\w+\.\w+Error: (.*?)\n\s+in \"(.+?)\", line (\d+), column (\d+)", held, re.S)
    if yaml_error:
        problem, path, line, column = yaml_error.groups()
        problem = " ".join(problem.split())
        return (
            f"error: {path}, line {line}, column {column}: {problem}\n  fix: correct the YAML of that file (a "
            "config option or recipe the command line selects)\n"
        )
    return held


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
def main(cfg: DictConfig) -> float | None:
    global _task_started
    if not _task_started and isinstance(sys.stderr, _HeldStderr):
        sys.stderr.real.write(sys.stderr.release())
    _task_started = True
    try:
        return driver.run(cfg)
    except ConfigError as err:
        driver.discard_empty_run_dir()
        print(err.render(), file=sys.stderr)
        sys.exit(2)


def _check_override_syntax(args: list[str]) -> None:
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        overrides = get_args_parser().parse_known_args(args)[0].overrides  # Hydra's own split of flags and overrides
    except SystemExit:
        return  # Hydra reports its own flag errors
    try:
        OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as exc:
        print(
            f"error: override {exc.override!r} is malformed: {str(exc.message).splitlines()[0]}\n"
            "  fix: write KEY=VALUE (quote values with spaces or brackets, e.g. 'run_dir=\"my run\"'); "
            "lists are [a,b]",
            file=sys.stderr,
        )
        sys.exit(2)


def _check_slurm_here(args: list[str]) -> None:
    """deployment=slurm submits through submitit, which needs SLURM's commands on this machine (without them it would
    fail with a traceback inside Hydra's launcher, before the runner's own checks)."""
    import shutil

    if "deployment=slurm" in args and not shutil.which("srun"):
        print(
            "error: deployment=slurm: SLURM's srun is not on this machine, so nothing can be submitted or planned "
            "through it here\n  fix: run the command on a SLURM login node (dry_run=true there shows the plan); on "
            "this machine, deployment=multi_node deployment.hostfile=FILE dry_run=true plans the same ranks",
            file=sys.stderr,
        )
        sys.exit(2)


def _completion_for_the_command(argv: list[str]) -> None:
    """`python -m runner -sc install=bash` installs completion for the `runner` command: Hydra's bash script completes
    `python FILE.py` or an installed command, not `python -m MODULE`, and would otherwise take over `python`'s own
    completion."""
    if argv[0].endswith("__main__.py") and any(a in ("-sc", "--shell-completion") for a in argv[1:]):
        argv[0] = "runner"


def cli() -> None:
    if sys.argv[1:2] and sys.argv[1] in ("ls", "show", "compare"):  # run management (runner/runs.py)
        from runner import runs

        sys.exit(runs.main(sys.argv[1:]))
    _completion_for_the_command(sys.argv)
    _check_override_syntax(sys.argv[1:])
    _check_slurm_here(sys.argv[1:])
    held = sys.stderr = _HeldStderr(sys.stderr)
    try:
        main()
    except SystemExit as exc:
        # Hydra reports composition errors (unknown group option, malformed or unknown override, a YAML error) with
        # exit code 1; they are bad input, so exit 2 as for every other bad input, with the runner's message.
        if not _task_started and isinstance(sys.stderr, _HeldStderr):
            text = held.release()
            sys.stderr.write(_rewrite(text, sys.argv[1:]) if exc.code == 1 else text)
        if exc.code == 1 and not _task_started:
            sys.exit(2)
        raise
    finally:
        if isinstance(sys.stderr, _HeldStderr):
            sys.stderr.write(held.release())


if __name__ == "__main__":
    cli()
