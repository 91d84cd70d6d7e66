"""Bad input on the command line: one clear message, exit code 2, no traceback, nothing left behind.

Every case runs the real CLI (`python -m runner ...`) in a fresh temporary directory, so that the run directory
Hydra would create (outputs/sft/<timestamp>) lands there and can be checked for leftovers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import write_jsonl

# a cheap stand-in for torch.cuda.is_available() (importing torch here would cost seconds): the NVIDIA driver is loaded
HAS_GPU = Path("/proc/driver/nvidia").exists()


def run_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runner", *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_rejected(
    result: subprocess.CompletedProcess, tmp_path: Path, *names: str, keep: tuple[Path, ...] = ()
) -> None:
    """The bad-input contract: exit 2, no traceback, a message naming the key/file, nothing written."""
    out, err = result.stdout, result.stderr
    context = f"exit code {result.returncode}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
    assert result.returncode == 2, context
    assert "Traceback" not in out and "Traceback" not in err, context
    assert err.strip(), context
    for name in names:
        assert name in err, f"{name!r} is not named on stderr\n{context}"
    # at most one message of the runner's own (`error: KEY: problem` + `  fix: ...`)
    assert len(error_lines(err)) <= 1, context

    outputs = tmp_path / "outputs"
    files = [p for p in outputs.rglob("*") if p.is_file() and p not in keep]
    assert files == [], f"files left behind: {files}"
    run_root = outputs / "sft"
    left = list(run_root.rglob("*")) if run_root.is_dir() else []
    assert left == [], f"run directories left behind: {left}"
    assert not run_root.exists() or not any(run_root.iterdir())


def garbage_file(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"this is not json {{{\n\x00\xff\xfe garbage ]]\n")
    return path


# ------------------------------------------------------------------------------------------ composition (Hydra)
HYDRA_CASES = [
    pytest.param(["zero=stage9"], ["zero/stage9", "stage3"], id="unknown-group-option"),
    pytest.param(["zero="], ["zero", "stage3"], id="empty-group-option"),
    pytest.param(["train.micro_batchsize=4"], ["train.micro_batchsize"], id="unknown-key"),
    pytest.param(["train.micro_batch_size=[1,"], ["train.micro_batch_size"], id="malformed-override"),
]


@pytest.mark.parametrize("overrides, names", HYDRA_CASES)
def test_composition_error(tmp_path, overrides, names):
    result = run_cli(tmp_path, *overrides)
    assert_rejected(result, tmp_path, *names)


# ------------------------------------------------------------------------------------------ plan (runner/plan.py)
PLAN_CASES = [
    pytest.param(
        ["train.global_batch_size=10", "train.micro_batch_size=4", "deployment=cpu", "deployment.nproc_per_node=2"],
        ["train.global_batch_size"],
        id="batch-does-not-divide",
    ),
    pytest.param(["precision=fp16"], ["precision", "fp32"], id="fp16-on-cpu"),
    pytest.param(
        ["zero=stage2", "+zero.offload_param.device=cpu"], ["zero.offload_param"], id="param-offload-below-stage3"
    ),
    pytest.param(
        ["zero=stage0", "+zero.offload_optimizer.device=cpu"], ["zero.offload_optimizer"], id="optimizer-offload-stage0"
    ),
    pytest.param(
        ["deployment=cpu", f"deployment.nproc_per_node={max(64, 4 * (os.cpu_count() or 1))}"],
        ["deployment.nproc_per_node"],
        id="more-cpu-ranks-than-cores",
    ),
    pytest.param(
        ["deployment=multi_node", "deployment.hostfile=/nonexistent/hostfile"],
        ["deployment.hostfile", "/nonexistent/hostfile"],
        id="missing-hostfile",
    ),
    pytest.param(
        ["data=local", "data.sets.local.path=/nonexistent/x.jsonl"],
        ["data.sets.local.path", "/nonexistent/x.jsonl"],
        id="missing-data-file",
    ),
    pytest.param(["data=local"], ["data.sets.local.path"], id="data-path-not-set"),
    pytest.param(["model.path=/nonexistent/model"], ["model.path", "/nonexistent/model"], id="missing-model-path"),
    pytest.param(["optimizer.lr=-1e-3"], ["optimizer.lr"], id="negative-lr"),
    # keys nothing reads, and raw DeepSpeed keys the run would ignore or refuse on the ranks
    pytest.param(["train.lr=1e-5"], ["train.lr", "optimizer.lr"], id="unknown-key-names-the-closest"),
    pytest.param(["+train.lr=1e-5"], ["train.lr", "optimizer.lr"], id="added-key-nothing-reads"),
    pytest.param(["+optimiser=adamw"], ["optimiser", "optimizer"], id="added-group-typo"),
    pytest.param(["+ds.gradient_clippin=1.0"], ["ds.gradient_clippin", "ds.gradient_clipping"], id="raw-ds-typo"),
    pytest.param(["+ds.fp16.enabled=true"], ["ds.fp16", "fp32"], id="raw-fp16-on-cpu"),
    pytest.param(
        ["zero=stage2", "+zero.stage3_max_live_parameters=5"],
        ["zero.stage3_max_live_parameters"],
        id="stage3-key-under-stage2",
    ),
    # plausible values that used to give a traceback or nothing
    pytest.param(["run_dir=/etc/hostname/run"], ["run_dir", "/etc/hostname"], id="run-dir-under-a-file"),
    pytest.param(["cache_dir=/etc/hostname/cache"], ["cache_dir", "/etc/hostname"], id="cache-dir-under-a-file"),
    pytest.param(["deployment.master_port=abc"], ["deployment.master_port"], id="master-port-not-a-number"),
    pytest.param(["deployment.master_port=70000"], ["deployment.master_port"], id="master-port-out-of-range"),
    pytest.param(["train.global_batch_size=0"], ["train.global_batch_size"], id="global-batch-zero"),
]


@pytest.mark.parametrize("overrides, names", PLAN_CASES)
def test_plan_error(tmp_path, overrides, names):
    assert_rejected(run_cli(tmp_path, *overrides), tmp_path, *names)


def test_zero_lr_keeps_existing_outputs(tmp_path):
    """Bad input removes only what this run created: files already under outputs/ survive."""
    keep = tmp_path / "outputs" / "keep.txt"
    keep.parent.mkdir()
    keep.write_text("an earlier run's notes\n")
    result = run_cli(tmp_path, "optimizer.lr=0")
    assert_rejected(result, tmp_path, "optimizer.lr", keep=(keep,))
    assert keep.read_text() == "an earlier run's notes\n"


@pytest.mark.skipif(HAS_GPU, reason="a GPU is visible here")
def test_single_gpu_without_gpu(tmp_path):
    result = run_cli(tmp_path, "deployment=single_gpu")
    assert_rejected(result, tmp_path, "deployment")
    assert "deployment=cpu" in result.stderr, result.stderr


@pytest.mark.skipif(HAS_GPU, reason="a GPU is visible here")
def test_single_gpu_without_gpu_gives_a_usable_fix(tmp_path):
    result = run_cli(tmp_path, "deployment=single_gpu")
    assert_rejected(result, tmp_path, "deployment")
    assert "at most 0" not in result.stderr, result.stderr


def test_model_path_is_not_a_model(tmp_path):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    result = run_cli(tmp_path, f"model.path={empty}")
    assert_rejected(result, tmp_path, "model.path", str(empty))


def test_resume_from_a_directory_that_is_not_a_run(tmp_path):
    not_a_run = tmp_path / "somewhere"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("not a run\n")
    result = run_cli(tmp_path, f"resume={not_a_run}")
    assert_rejected(result, tmp_path, "resume")
    assert (not_a_run / "notes.txt").read_text() == "not a run\n"


# ------------------------------------------------------------------------------------------ data files (runner/data.py)
# data.max_seq_len=64 keeps these runs short
# (separate) complaint out of the way so that the data file itself is checked.
def test_malformed_data_file(tmp_path):
    bad = garbage_file(tmp_path)
    result = run_cli(tmp_path, "data=local", f"data.sets.local.path={bad}", "data.max_seq_len=64")
    assert_rejected(result, tmp_path, "data.sets.local.path", str(bad))


def test_malformed_data_file_message_says_what_is_wrong(tmp_path):
    bad = garbage_file(tmp_path)
    result = run_cli(tmp_path, "data=local", f"data.sets.local.path={bad}", "data.max_seq_len=64")
    assert_rejected(result, tmp_path, "data.sets.local.path")
    message = result.stderr[result.stderr.index("error: data.sets.local.path") :]
    assert "JSON" in message, message  # what is wrong: the file is not valid JSON lines
    assert "Failed to load JSON" not in result.stdout + result.stderr.replace(message, "")  # and only one message


def test_malformed_data_file_with_default_seq_len(tmp_path):
    bad = garbage_file(tmp_path)
    result = run_cli(tmp_path, "data=local", f"data.sets.local.path={bad}")
    assert_rejected(result, tmp_path, "data.sets.local.path")


def test_data_file_without_the_prompt_column(tmp_path):
    rows = [{"question": f"what is {i} plus {i}?", "answer": f"{2 * i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    result = run_cli(tmp_path, "data=local", f"data.sets.local.path={path}", "data.max_seq_len=64")
    assert_rejected(result, tmp_path, "data.sets.local", "'prompt'")


# ------------------------------------------------------------------------------------------------- PPO inputs
@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Stand-ins for an SFT export, a reward export, and a reward export whose tokenizer differs (one token more)."""
    from tests.helpers import TINY_TOKENIZER, fake_exports

    actor, reward = fake_exports()
    other = tmp_path_factory.mktemp("other_tokenizer") / "reward"
    import shutil

    shutil.copytree(reward, other)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    return {"actor": actor, "reward": reward, "other": other}


PPO_BASE = ["step=ppo", "step.max_prompt_len=64", "step.generation.max_new_tokens=64"]


def test_ppo_rejects_an_sft_export_given_as_critic(tmp_path, exports):
    result = run_cli(tmp_path, *PPO_BASE, f"step.actor_from={exports['actor']}", f"step.critic_from={exports['actor']}")
    assert_rejected(result, tmp_path, "step.critic_from", "causal_lm", "reward model")


def test_ppo_rejects_a_missing_export(tmp_path, exports):
    result = run_cli(
        tmp_path, *PPO_BASE, f"step.actor_from={tmp_path / 'nowhere'}", f"step.critic_from={exports['reward']}"
    )
    assert_rejected(result, tmp_path, "step.actor_from", "no config.json")


def test_ppo_rejects_mismatched_tokenizers(tmp_path, exports):
    result = run_cli(tmp_path, *PPO_BASE, f"step.actor_from={exports['actor']}", f"step.critic_from={exports['other']}")
    assert_rejected(result, tmp_path, "step.critic_from", "tokenizer")


def test_ppo_rejects_prompts_longer_than_the_prompt_length(tmp_path, exports):
    result = run_cli(
        tmp_path,
        *PPO_BASE[:1],
        "step.max_prompt_len=8",
        "step.generation.max_new_tokens=64",
        f"step.actor_from={exports['actor']}",
        f"step.critic_from={exports['reward']}",
    )
    assert_rejected(result, tmp_path, "step.max_prompt_len", "longer than", "data.overlong=drop")


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["step.generation_batch_size=6", "train.micro_batch_size=4"], "train.micro_batch_size"),
        (
            ["step.generation_batch_size=8", "train.micro_batch_size=4", "train.gradient_accumulation_steps=3"],
            "train.gradient_accumulation_steps",
        ),
        (["step.max_prompt_len=200"], "step.max_prompt_len"),  # 200 + 64 > the tiny model's 256 positions
        (["step.kl.type=sometimes"], "step.kl.type"),
    ],
)
def test_ppo_rejects_impossible_settings(tmp_path, exports, overrides, key):
    result = run_cli(
        tmp_path, *PPO_BASE, f"step.actor_from={exports['actor']}", f"step.critic_from={exports['reward']}", *overrides
    )
    assert_rejected(result, tmp_path, key)


# ------------------------------------------------------------------------------------------------- DPO inputs
@pytest.mark.parametrize(
    "overrides, names",
    [
        (["step.beta=0"], ["step.beta", "positive"]),
        (["step.beta=-0.1"], ["step.beta"]),
        (["step.loss=simpo", "step.reference_from={actor}"], ["step.reference_from", "reference-free"]),
        (["step.loss=orpo", "step.precompute_reference=true"], ["step.precompute_reference", "reference-free"]),
        (["step.loss=kto"], ["step.loss", "sigmoid"]),
        (["step.loss=ipo", "step.label_smoothing=0.1"], ["step.label_smoothing", "sigmoid"]),
        (["step.init_from={reward}"], ["step.init_from", "reward_model"]),
        (["reward=model", "reward.terms.0.model={actor}"], ["reward.terms.0.model", "causal_lm"]),
        (["reward=tiny", "reward.terms.0.fn=runner.rewards.tiny:no_such_function"], ["reward.terms.0.fn"]),
    ],
)
def test_dpo_rejects_bad_settings(tmp_path, exports, overrides, names):
    given = [o.format(actor=exports["actor"], reward=exports["reward"]) for o in overrides]
    result = run_cli(tmp_path, "step=dpo", f"step.init_from={exports['actor']}", *given)
    assert_rejected(result, tmp_path, *names)


# ------------------------------------------------------------------------------------------------- GRPO inputs
@pytest.mark.parametrize(
    "overrides, names",
    [
        ([], ["reward", "reward="]),  # critic-free RL needs something to score its answers
        (["reward=tiny", "step.advantage=gae"], ["step.advantage", "step=ppo"]),
        (["reward=tiny", "step.advantage=ppo_clip"], ["step.advantage", "rloo"]),
        (["reward=tiny", "step.kl.placement=sometimes"], ["step.kl.placement"]),
        (["reward=tiny", "step.kl.estimator=k4"], ["step.kl.estimator", "k3"]),
        (["reward=tiny", "step.loss_agg=mean"], ["step.loss_agg", "token-mean"]),
        (["reward=tiny", "step.dual_clip=0.5"], ["step.dual_clip", "above 1"]),
        (["reward=tiny", "step.rollout.n=0"], ["step.rollout.n"]),
        (["reward=tiny", "step.rollout.n=3", "train.micro_batch_size=16"], ["train.micro_batch_size", "24 answers"]),
        (["reward=tiny", "train.gradient_accumulation_steps=3"], ["train.gradient_accumulation_steps"]),
        (["reward=tiny", "step.overlong.enabled=true", "step.overlong.buffer=300"], ["step.overlong.buffer"]),
        (["reward=tiny", "step.init_from={reward}"], ["step.init_from", "reward_model"]),
    ],
)
def test_grpo_rejects_bad_settings(tmp_path, exports, overrides, names):
    given = [o.format(reward=exports["reward"]) for o in overrides]
    result = run_cli(tmp_path, "step=grpo", *given)
    assert_rejected(result, tmp_path, *names)


# ---------------------------------------------------------------------------------------- self-feedback inputs
@pytest.mark.parametrize(
    "overrides, names",
    [
        ([], ["reward", "reward="]),  # nothing to judge the candidates
        (["reward=tiny", "step.accept.rule=majority"], ["step.accept.rule", "beat_reference"]),
        (["reward=tiny", "step.accept.rule=threshold"], ["step.accept.threshold", "is needed"]),
        (["reward=tiny", "step.accept.threshold=1.0"], ["step.accept.threshold", "only read"]),
        (["reward=tiny", "step.alpha=[0.5,0.5]"], ["step.alpha", "2 values for 3 rounds"]),
        (["reward=tiny", "step.alpha=1.5"], ["step.alpha", "[0, 1]"]),
        (["reward=tiny", "train.max_steps=7"], ["train.max_steps", "step.rounds"]),
        (["reward=tiny", "step.candidates=0"], ["step.candidates"]),
    ],
)
def test_self_feedback_rejects_bad_settings(tmp_path, overrides, names):
    assert_rejected(run_cli(tmp_path, "step=self_feedback", *overrides), tmp_path, *names)


def test_dpo_rejects_data_without_chosen_and_rejected(tmp_path, exports):
    path = write_jsonl(tmp_path / "sft_only.jsonl", [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(8)])
    result = run_cli(
        tmp_path, "step=dpo", f"step.init_from={exports['actor']}", "data=local", f"data.sets.local.path={path}"
    )
    assert_rejected(result, tmp_path, "data.sets.local", "chosen")


def test_pipeline_rejects_a_stage_key_outside_a_stage_list(tmp_path):
    result = run_cli(tmp_path, "step=rlhf", "step.kl.coef=0.05")  # Hydra's own check: no such key in the pipeline
    assert_rejected(result, tmp_path, "step.kl.coef")
    result = run_cli(tmp_path, "step=rlhf", "+step.kl.coef=0.05")  # added anyway: it would reach no stage
    assert_rejected(result, tmp_path, "step.kl.coef", "step.ppo=")


# ------------------------------------------------------------------------------------------ files and data
def test_a_yaml_error_names_the_file_and_line_only(tmp_path):
    conf = tmp_path / "extra" / "recipe"
    conf.mkdir(parents=True)
    (conf / "broken.yaml").write_text("# @package _global_\ntrain:\n  max_steps: 3\n   bad: [1,\n")
    result = run_cli(tmp_path, f"hydra.searchpath=[file://{tmp_path / 'extra'}]", "recipe=broken")
    assert_rejected(result, tmp_path, "broken.yaml", "line 4")
    assert len(result.stderr.splitlines()) <= 3


@pytest.mark.parametrize(
    "content, names",
    [
        (b"", ["data.sets.local.path", "is empty"]),
        (b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": }\n', ["line 2", "not valid JSON"]),
    ],
)
def test_data_file_problems_say_where(tmp_path, content, names):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    result = run_cli(tmp_path, "data=local", f"data.sets.local.path={path}", "data.sets.local.sft_target=response")
    assert_rejected(result, tmp_path, *names)


def test_a_blend_weight_that_rounds_to_no_rows(tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(30)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    result = run_cli(
        tmp_path,
        "data=[tiny,local]",
        f"data.sets.local.path={path}",
        "data.sets.local.weight=0.01",
        "data.sets.local.sft_target=response",
    )
    assert_rejected(result, tmp_path, "data.sets.local.weight", "0 rows")


def test_a_model_directory_without_weights(tmp_path):
    import shutil

    from tests.helpers import fake_exports

    model = tmp_path / "model"
    shutil.copytree(fake_exports()[0], model)
    (model / "model.safetensors").unlink()
    assert_rejected(run_cli(tmp_path, f"model.path={model}"), tmp_path, "model.path", "no weights")


def test_fewer_samples_than_one_batch_even_with_max_steps(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "small.jsonl", rows)  # SFT's share: 18 rows for training, 2 for evaluation
    result = run_cli(
        tmp_path,
        "data=local",
        f"data.sets.local.path={path}",
        "data.split={sft:1}",
        "train.max_steps=5",
        "train.micro_batch_size=32",
    )
    cache = tuple((tmp_path / "outputs" / ".cache").rglob("*"))  # the tokenised data is cached for the next try
    assert_rejected(result, tmp_path, "train.micro_batch_size", "fewer than one step", keep=cache)


def test_a_corrupt_weights_file_is_named(tmp_path, exports):
    """A truncated safetensors file in an export the run reads (an interrupted download): one message naming the
    file, exit 2, nothing written."""
    import shutil

    broken = tmp_path / "broken_reward"
    shutil.copytree(exports["reward"], broken)
    (broken / "model.safetensors").write_bytes(b"\x01\x02")
    result = run_cli(tmp_path, *PPO_BASE, f"step.actor_from={exports['actor']}", f"step.critic_from={broken}")
    assert_rejected(result, tmp_path, "model.safetensors", "not a readable safetensors file")
