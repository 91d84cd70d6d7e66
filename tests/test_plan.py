"""The plan's answers: does a run fit its hardware (activations, KV cache, every engine, the verdict and the cheapest
change that fits), and how long will a step take. Pure functions over composed configs; the calibration against
measured memory is bench/calibrate_memory.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from runner import modeling
from runner.driver import fit
from runner.driver.estimate import Arch, Pass, head_bytes, layer_bytes, pass_bytes, pass_flops
from runner.driver.plan import make_plan
from tests.helpers import CPU, GPU, fake_exports

GiB = 1024**3


def assess(compose, overrides: list[str], hw=GPU) -> dict:
    plan = make_plan(compose(overrides), hw)
    cfg, method = plan.cfg, plan.method
    sizes = {"": (modeling.count_params(cfg.model), modeling.largest_layer(cfg.model))}
    gpn, nodes = max(plan.nodes.values()), len(plan.nodes)
    configs = method.engine_configs(cfg, plan.world_size, 1, "/nonexistent")
    return fit.assess(cfg, method, configs, sizes, gpn, nodes, total_steps=100)


def test_activations_by_hand():
    """OPT-like layer, b=2, s=8, h=16, f=64, 4 heads, fp32: (6 + 2) b s h w + 2 b s f w; gated MLPs keep 4 b s f w;
    a grouped-query model keeps smaller k and v; the head keeps logits, fp32 log-softmax and two gradients."""
    opt = Arch(hidden=16, layers=3, heads=4, kv_heads=4, ffn=64, vocab=100, gated=False, dropout=False)
    assert layer_bytes(opt, 2, 8, 4) == 8 * 2 * 8 * 16 * 4 + 2 * 2 * 8 * 64 * 4
    gqa = Arch(hidden=16, layers=3, heads=4, kv_heads=1, ffn=64, vocab=100, gated=True, dropout=False)
    assert layer_bytes(gqa, 2, 8, 2) == int((6 + 0.5) * 2 * 8 * 16 * 2 + 4 * 2 * 8 * 64 * 2)
    assert head_bytes(opt, 2, 8, 4, "lm", backward=True) == 2 * 8 * 100 * 12
    assert head_bytes(opt, 2, 8, 2, "lm", backward=True) == 2 * 8 * 100 * 14
    assert head_bytes(opt, 2, 8, 2, "lm", backward=False) == 2 * 8 * 100 * (2 + 4 + 4)
    assert head_bytes(opt, 2, 8, 4, "value", backward=True) == 0
    train = pass_bytes(opt, Pass("", "train", 2, 8), 4, checkpointing=False)
    assert train["activations"] == 3 * layer_bytes(opt, 2, 8, 4)
    ckpt = pass_bytes(opt, Pass("", "train", 2, 8), 4, checkpointing=True)
    assert ckpt["activations"] == 3 * 2 * 8 * 16 * 4 + layer_bytes(opt, 2, 8, 4) < train["activations"]
    gen = pass_bytes(gqa, Pass("", "generate", 4, 10, new=6), 2, checkpointing=False)
    assert gen["KV cache"] == 2 * 3 * 4 * 16 * (16 // 4) * 2  # K and V, layers, batch, tokens, kv width, bytes
    assert pass_flops(1000, Pass("", "train", 2, 8)) == 6 * 1000 * 16
    assert pass_flops(1000, Pass("", "generate", 2, 8, new=4)) == 2 * 1000 * 2 * 12


def test_opt_66b_on_one_gpu_does_not_fit_and_the_suggestion_does(compose):
    base = ["model=opt-66b", "deployment=single_gpu", "zero=stage0"]
    got = assess(compose, base)
    assert got["verdict"] == "does not fit" and got["hardware"]["name"] == "a100-80g"  # assumed: no GPU here
    assert got["biggest"][0] == "model states: model" and got["terms_gb"]["model states: model"] > 1000
    suggestion = got["suggestion"]["overrides"]
    assert any(o.startswith("zero=stage3_offload") for o in suggestion)
    after = assess(compose, base + suggestion)
    assert after["verdict"] == "fits" and after["peak_gb"] == pytest.approx(got["suggestion"]["peak_gb"])
    problem, fix_ = fit.refusal(got)
    assert "does not fit" in problem and "model states" in problem and " ".join(suggestion) in fix_


def test_opt_1_3b_fits_an_a100_80g_with_headroom(compose):
    got = assess(compose, ["model=opt-1.3b", "deployment=single_gpu", "hardware=a100-80g", "zero=stage2"])
    assert got["verdict"] == "fits" and 0.3 < got["headroom"] < 0.9 and "suggestion" not in got
    assert got["terms_gb"]["model states: model"] == pytest.approx(24.5, abs=0.05)  # DeepSpeed's estimator
    smaller = assess(compose, ["model=opt-1.3b", "deployment=single_gpu", "hardware=rtx3090", "zero=stage2"])
    assert smaller["verdict"] == "does not fit" and smaller["suggestion"]


def test_every_swept_key_that_matters_moves_the_peak(compose):
    base = ["model=opt-1.3b", "deployment=single_node", "hardware=a100-80g"]
    peak = {
        extra: assess(compose, base + list(extra))["peak_gb"]
        for extra in [
            ("train.micro_batch_size=1",),
            ("train.micro_batch_size=4",),
            ("train.micro_batch_size=4", "zero=stage3"),
            ("train.micro_batch_size=4", "train.gradient_checkpointing=true"),
            ("train.micro_batch_size=4", "data.max_seq_len=256"),
        ]
    }
    four = peak[("train.micro_batch_size=4",)]
    assert peak[("train.micro_batch_size=1",)] < four
    assert all(v < four for k, v in peak.items() if len(k) == 2)


def test_ppo_plans_all_four_engines_and_the_kv_cache(compose):
    sft, rm = fake_exports()
    got = assess(compose, ["step=ppo", f"step.actor_from={sft}", f"step.critic_from={rm}", "deployment=cpu"], CPU)
    engines = got["model_states"]["engines"]
    assert set(engines) >= {"", "critic", "reference", "reward"}
    assert engines["critic"]["trained"] and not engines["reference"]["trained"]
    assert {"model states: actor", "model states: critic", "model states: reference", "model states: reward"} <= set(
        got["terms_gb"]
    )
    plan = make_plan(compose(["step=ppo", f"step.actor_from={sft}", f"step.critic_from={rm}", "deployment=cpu"]), CPU)
    passes = {p.what: p for p in plan.method.workload(plan.cfg, 1)}
    gen, step = passes["generation"], plan.cfg.step
    assert (gen.kind, gen.batch, gen.seq, gen.new) == (
        "generate",
        step.generation_batch_size,
        step.max_prompt_len,
        step.generation.max_new_tokens,
    )
    assert {"experience: reference", "experience: reward model", "actor training", "critic training"} <= set(passes)
    assert got["hardware"]["name"] == "cpu" and got["time"]["step_s"] > 0


def test_the_time_estimate_is_flops_over_assumed_peak(compose):
    got = assess(compose, ["model=opt-1.3b", "deployment=single_gpu", "hardware=h100-80g", "data.max_seq_len=512"])
    tokens = 8 * 512
    assert got["time"]["flops_per_step_per_device"] == pytest.approx(6 * 1315758080 * tokens)
    assert got["time"]["step_s"] == pytest.approx(6 * 1315758080 * tokens / (989e12 * 0.35))
    assert got["time"]["run_s"] == pytest.approx(100 * got["time"]["step_s"])
    assert "35% of 989" in got["time"]["assumption"]


def test_hardware_choices(compose):
    with pytest.raises(Exception) as err:
        make_plan(compose(["hardware=a100-80g", "deployment=cpu"]), CPU)
    assert err.value.where == "hardware"
    cpu = make_plan(compose(["deployment=cpu", "deployment.nproc_per_node=2"]), CPU).cfg.hardware
    assert cpu.name == "cpu" and cpu.device_memory_gb == pytest.approx(cpu.host_memory_gb / 2, abs=0.01)
    assert make_plan(compose(["deployment=single_gpu", "hardware=l40s"]), GPU).cfg.precision.dtype == "bf16"


def test_a_run_that_cannot_fit_is_refused_before_anything_is_written(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "runner", "hardware=cpu", "hardware.host_memory_gb=0.2", "train.max_steps=2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: plan: the plan does not fit" in proc.stderr and "plan.on_unfit=launch" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_plan_json_round_trips(compose):
    got = assess(compose, ["model=opt-1.3b", "deployment=single_gpu"])
    assert json.loads(json.dumps(got))["verdict"] == got["verdict"]


def test_parallel_degrees_and_zeropp_are_planned(compose):
    base = ["model=opt-1.3b", "deployment=single_node", "hardware=a100-80g", "train.micro_batch_size=4"]
    plain = assess(compose, base)
    tp = assess(compose, base + ["parallel.tensor=2"])
    sp = assess(compose, base + ["parallel.sequence=2"])
    assert tp["terms_gb"]["model states: model"] < 0.7 * plain["terms_gb"]["model states: model"]
    assert sp["terms_gb"]["activations (training)"] == pytest.approx(plain["terms_gb"]["activations (training)"] / 2)
    assert tp["time"]["step_s"] == pytest.approx(plain["time"]["step_s"] / 2)  # a pair of ranks shares each batch
    hpz = assess(compose, base + ["zero=stage3_zeropp", "zero.zero_hpz_partition_size=8"])
    assert hpz["terms_gb"]["ZeRO++ hpZ secondary weights"] == pytest.approx(2 * 1315758080 / 8 / GiB, abs=1e-4)


def test_auto_hardware_reads_the_visible_gpus(tmp_path, monkeypatch, compose):
    """hardware=auto on a GPU host: name and memory from nvidia-smi (a stand-in script answering its queries),
    CUDA_VISIBLE_DEVICES respected, the peak speed of the matching preset."""
    from runner.driver import deployment, hardware

    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        '#!/bin/sh\ncase "$1" in\n'
        "  *compute_cap*) printf '0, 9.0\\n1, 8.0\\n' ;;\n"
        "  *) printf '0, NVIDIA H100 80GB HBM3, 81559\\n1, NVIDIA A100-SXM4-40GB, 40960\\n' ;;\nesac\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert deployment._nvidia_smi() == [8.0]
    assert hardware._visible_gpus() == [("NVIDIA A100-SXM4-40GB", 40.0)]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    cfg = make_plan(compose(["deployment=single_node"]), GPU).cfg.hardware
    assert (cfg.device, cfg.device_memory_gb, cfg.peak_tflops, cfg.devices_per_node) == (
        "NVIDIA H100 80GB HBM3",
        79.6,
        989,
        2,
    )
