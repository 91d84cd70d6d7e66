"""Shared fixtures: compose the real Hydra config tree in-process, write hostfiles, keep the hub offline."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"


@pytest.fixture(scope="session")
def compose(tmp_path_factory):
    """compose(overrides) -> the composed DictConfig, as `python -m runner OVERRIDES` would see it (a fresh copy).

    `hydra:` is left out (return_hydra_config=False). `run_dir` is set to a temporary directory unless the overrides
    set it: its default comes from Hydra's job runtime, which exists only inside `@hydra.main`. `import runner`
    registers the `asset` resolver the data and model groups use. Results are memoised by overrides (composing takes
    ~0.1 s) and handed out as deep copies.
    """
    import copy

    import hydra

    import runner  # noqa: F401  (registers the `asset` resolver)

    run_dir = tmp_path_factory.mktemp("compose") / "run"
    memo = {}

    def _compose(overrides=(), return_hydra_config: bool = False):
        overrides = list(overrides)
        if not any(o.lstrip("+~").startswith("run_dir=") for o in overrides):
            overrides.append(f"run_dir='{run_dir}'")
        key = (tuple(overrides), return_hydra_config)
        if key not in memo:
            with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                memo[key] = hydra.compose("config", overrides=overrides, return_hydra_config=return_hydra_config)
        return copy.deepcopy(memo[key])

    return _compose


@pytest.fixture
def hostfile(tmp_path):
    """hostfile(text="worker-0 slots=8\\nworker-1 slots=8") -> path of an MPI-style hostfile in tmp_path."""

    def _write(text: str = "worker-0 slots=8\nworker-1 slots=8\n", name: str = "hostfile") -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return _write


@pytest.fixture
def hf_offline(monkeypatch):
    """No test may touch the network: hub lookups fail at once instead of retrying for ~20 s."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def sft_run(sft_runs):
    """The default short SFT run (ZeRO-0, one rank, 40 steps), whose export later end-to-end tests start from."""
    return sft_runs("stage0")


@pytest.fixture(scope="session")
def sft_runs(tmp_path_factory):
    """SFT runs (40 steps) shared by the tests that need the same run: runs(zero, ranks) -> run directory;
    runs.console(zero, ranks) -> what the command printed (its CompletedProcess)."""
    from tests.helpers import QUICK, run_cli, run_dir_of

    done = {}

    def proc(zero: str, ranks: int = 1):
        if (zero, ranks) not in done:
            extra = ["deployment=cpu", f"deployment.nproc_per_node={ranks}", f"train.micro_batch_size={8 // ranks}"]
            done[zero, ranks] = run_cli(
                tmp_path_factory.mktemp(f"sft_{zero}_{ranks}"), f"zero={zero}", *(extra if ranks > 1 else []), *QUICK
            )
        return done[zero, ranks]

    def get(zero: str, ranks: int = 1):
        return run_dir_of(proc(zero, ranks))

    get.console = proc
    return get


@pytest.fixture(scope="session")
def reward_run(sft_run, tmp_path_factory):
    """A short reward run (60 steps) started from the default SFT run's export: PPO's critic and reward model."""
    from tests.helpers import run_cli, run_dir_of

    return run_dir_of(
        run_cli(
            tmp_path_factory.mktemp("reward_for_ppo"),
            "step=reward",
            f"step.init_from={sft_run / 'export'}",
            "train.max_steps=60",
            "train.log_every=20",
            "train.eval_every=60",
            "train.eval_max_batches=2",
        )
    )
