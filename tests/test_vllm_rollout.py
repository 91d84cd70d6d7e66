"""step.rollout.backend=vllm: the sampling settings in vLLM's terms, vLLM's answers and log-probs read back and laid
out like the actor's, the answers scored by the actor's own model, the mismatch metric, the driver's checks and the
memory plan. vLLM itself needs a CUDA GPU (bench/gpu_check.sh runs it there); nothing here imports it."""

from __future__ import annotations

import json
import types

import pytest
import torch
from omegaconf import OmegaConf

from runner.driver.plan import make_plan
from runner.errors import ConfigError
from runner.rl.experience import action_mask
from runner.train import rollout
from runner.train.vllm_rollout import VllmRollout, answer_of, model_config, rollout_logprobs, sampling_kwargs
from tests.helpers import CPU, GPU, fake_exports, run_cli
from tests.test_plan import assess

GRPO = ["step=grpo", "reward=tiny", "deployment=single_gpu", "dry_run=true"]


def _gen(**keys):
    gen = OmegaConf.create(
        {"max_new_tokens": 16, "do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 0.9}
        | {"repetition_penalty": 1.1}
    )
    gen.update(keys)
    return rollout.generation_config(gen, pad_id=1, eos_id=2)


def test_sampling_settings_map_one_to_one():
    assert sampling_kwargs(_gen()) == {
        "n": 1,
        "max_tokens": 16,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": -1,  # transformers' "off" (0/None) is vLLM's -1
        "repetition_penalty": 1.1,
        "stop_token_ids": [2],
        "ignore_eos": True,
        "detokenize": False,
    }
    assert sampling_kwargs(_gen(top_k=5))["top_k"] == 5
    greedy = sampling_kwargs(_gen(do_sample=False))
    assert greedy["temperature"] == 0.0 and greedy["top_k"] == -1 and greedy["top_p"] == 1.0


def _completion(ids, lps):
    """vLLM's CompletionOutput as it carries an answer: token ids and one {token id: Logprob} per position."""
    steps = [{t: types.SimpleNamespace(logprob=lp)} for t, lp in zip(ids, lps)]
    return types.SimpleNamespace(token_ids=ids, logprobs=steps)


def test_answers_end_at_eos_and_keep_their_logprobs():
    assert answer_of(_completion([5, 6, 2], [-1.0, -2.0, -0.5]), eos_id=2, max_new_tokens=16) == (
        [5, 6, 2],
        [-1.0, -2.0, -0.5],
    )
    assert answer_of(_completion([5, 2, 7], [-1.0, -2.0, -3.0]), 2, 16) == ([5, 2], [-1.0, -2.0])
    assert answer_of(_completion([5, 6, 7], [-1.0, -2.0, -3.0]), 2, 2) == ([5, 6], [-1.0, -2.0])


def test_rollout_logprobs_sit_where_the_action_mask_is():
    lps = [[-1.0, -2.0], [-3.0]]
    prompt_lens, width = [3, 2], 6
    out = rollout_logprobs(lps, prompt_lens, width)
    mask = action_mask(prompt_lens, [2, 1], width)
    assert out.shape == mask.shape == (2, 5)
    assert out[mask.bool()].tolist() == [-1.0, -2.0, -3.0] and not out[~mask.bool()].any()


def test_vllm_answers_are_scored_by_the_actor_and_the_mismatch_is_measured():
    """rollout.experience with a vLLM sampler: the log-probs come from the actor's model (not vLLM's), vLLM's sit
    beside them in rollout_logprobs at the same positions; here vLLM's are the actor's own plus 0.1, so the mean
    absolute mismatch over the answer tokens is 0.1."""
    from runner.train import models

    model = OmegaConf.load("conf/model/tiny.yaml")
    model.path, model.dropout = None, 0.0
    torch.manual_seed(0)
    net = models.load_causal_lm(model, {"zero_optimization": {"stage": 0}}, "fp32").eval()
    prompts, answers = [[3, 4, 5], [6, 7]], [[8, 9, 2], [10, 2]]
    plain = rollout.experience(prompts, answers, 1, torch.device("cpu"), net, lambda ids, mask, lens: torch.zeros(2))
    mask = plain.action_mask.bool()
    actor = [plain.logprobs[i][mask[i]].tolist() for i in range(2)]
    sampler = VllmRollout.__new__(VllmRollout)  # vLLM's engine itself needs a GPU: its answers are given here
    sampler.engine, sampler.last_logprobs = net, [[v + 0.1 for v in row] for row in actor]
    exp = rollout.experience(prompts, answers, 1, torch.device("cpu"), sampler, lambda ids, mask, lens: torch.zeros(2))
    assert torch.equal(exp.logprobs, plain.logprobs)
    diff = ((exp.rollout_logprobs - exp.logprobs).abs() * exp.action_mask).sum() / exp.action_mask.sum()
    assert float(diff) == pytest.approx(0.1, abs=1e-5)
    chunk = exp.chunk(torch.tensor([1]))  # trimmed with the other (B, L) fields
    assert chunk.rollout_logprobs.shape == chunk.logprobs.shape


def test_vllm_builds_the_policys_architecture(tmp_path):
    """vLLM builds its model from config.json: a policy built from a config (no `architectures`) and a LoRA policy
    both name their causal-LM class there."""
    from runner.train import models

    model = OmegaConf.load("conf/model/tiny.yaml")
    model.path, model.dropout = None, 0.0
    plain = models.load_causal_lm(model, {"zero_optimization": {"stage": 0}}, "fp32")
    assert not plain.config.architectures
    lora = OmegaConf.create({"r": 4, "alpha": 16, "dropout": 0.0, "target_modules": "auto", "only_optimize": True})
    adapted = models.load_causal_lm(model, {"zero_optimization": {"stage": 0}}, "fp32", lora=lora, lora_r=4)
    for net in (plain, adapted):
        model_config(net).save_pretrained(tmp_path)
        assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["OPTForCausalLM"]
    assert not plain.config.architectures  # the policy's own config is left as it was


def test_on_cpu_vllm_is_a_clear_error(tmp_path):
    proc = run_cli(tmp_path, "step=grpo", "reward=tiny", "step.rollout.backend=vllm", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "step.rollout.backend: vLLM generates on CUDA GPUs" in proc.stderr
    assert "use step.rollout.backend=hf here" in proc.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("config.yaml"))


@pytest.mark.parametrize(
    "overrides, where",
    [
        (["step.rollout.backend=sglang"], "step.rollout.backend"),
        (["step.rollout.gathered_copy=true", "zero=stage3"], "step.rollout.gathered_copy"),
        (["step.rollout.vllm.gpu_memory_utilization=1.5"], "step.rollout.vllm.gpu_memory_utilization"),
        (["step.rollout.vllm.sleep_level=3"], "step.rollout.vllm.sleep_level"),
        (["step.rollout.vllm.max_num_seqs=0"], "step.rollout.vllm.max_num_seqs"),
        (["step.generation.temperature=2.5"], "step.generation.temperature"),
    ],
)
def test_bad_vllm_settings_are_refused(compose, overrides, where):
    backend = [] if any(o.startswith("step.rollout.backend") for o in overrides) else ["step.rollout.backend=vllm"]
    with pytest.raises(ConfigError) as err:
        make_plan(compose([*GRPO, *backend, *overrides]), GPU)
    assert err.value.where == where


def test_a_real_run_without_vllm_installed_is_refused_and_a_dry_run_says_so(compose):
    with pytest.raises(ConfigError) as err:
        make_plan(compose(["step=grpo", "reward=tiny", "deployment=single_gpu", "step.rollout.backend=vllm"]), GPU)
    assert "not installed" in err.value.problem and "pip install .[vllm]" in err.value.fix
    plan = make_plan(compose([*GRPO, "step.rollout.backend=vllm", "zero=stage3"]), GPU)
    assert any("not installed" in n for n in plan.notes)
    assert plan.cfg.step.rollout.gathered_copy is False  # vLLM holds the whole copy
    sft, rm = fake_exports()
    ppo = ["step=ppo", f"step.actor_from={sft}", f"step.critic_from={rm}", "deployment=single_gpu", "dry_run=true"]
    assert make_plan(compose([*ppo, "step.rollout.backend=vllm"]), GPU).cfg.step.rollout.backend == "vllm"
    with pytest.raises(ConfigError) as err:
        make_plan(compose([*ppo, "step.rollout.backend=vllm", "step.hybrid_engine.enabled=true"]), GPU)
    assert err.value.where == "step.rollout.backend"
    assert make_plan(compose(["step=grpo", "reward=tiny"]), CPU).cfg.step.rollout.backend == "hf"


def test_the_plan_counts_vllms_share_of_the_gpu(compose):
    base = [*GRPO, "model=qwen2.5-0.5b-instruct", "hardware=a100-80g"]
    hf = assess(compose, base)
    asleep = assess(compose, [*base, "step.rollout.backend=vllm"])
    awake = assess(compose, [*base, "step.rollout.backend=vllm", "step.rollout.vllm.sleep_level=0"])
    key = "vLLM rollout engine (while it generates; asleep while training)"
    assert asleep["terms_gb"][key] == pytest.approx(0.3 * 80)
    assert not any("KV cache" in k for k in asleep["terms_gb"])  # generation's cache is inside vLLM's share
    assert awake["terms_gb"]["vLLM rollout engine (awake throughout)"] == pytest.approx(0.3 * 80)
    passes = sum(v for k, v in hf["terms_gb"].items() if "(experience" in k)  # the peak pass here: not generation
    assert passes > 1 and awake["peak_gb"] == pytest.approx(hf["peak_gb"] + 0.3 * 80, abs=0.01)  # on top of it
    assert asleep["peak_gb"] == pytest.approx(hf["peak_gb"] - passes + 0.3 * 80, abs=0.01)  # instead of it
    small = assess(compose, [*base, "step.rollout.backend=vllm", "step.rollout.vllm.gpu_memory_utilization=0.01"])
    assert not any(k.startswith("vLLM") for k in small["terms_gb"])  # asleep, smaller than training's peak
