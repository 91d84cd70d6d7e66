"""`python -m runner [overrides]`: compose, plan, write the run directory, launch the ranks.

The Hydra process is the only one that parses the command line. It validates everything it can before writing a
single file, so bad input leaves nothing behind; then it writes config.yaml, overrides.yaml, ds_config.json and
launch.sh into the run directory and starts the real launcher (deepspeed or torchrun) on `runner.worker`.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from runner.driver import run as driver
from runner.errors import ConfigError

_task_started = False


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    global _task_started
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


def cli() -> None:
    _check_override_syntax(sys.argv[1:])
    try:
        main()
    except SystemExit as exc:
        # Hydra reports composition errors (unknown group option, malformed or unknown override) with its own clear
        # message and exit code 1; they are bad input, so exit 2 as for every other bad input.
        if exc.code == 1 and not _task_started:
            sys.exit(2)
        raise


if __name__ == "__main__":
    cli()
