"""Does a run fit, and how fast will it be? The plan's answer, per device, against the `hardware` it runs on.

Peak memory of a device = the runtime's overhead + the model states of every engine (runner.driver.memory, each
with its own ZeRO stage and offload) + ZeRO-3's prefetch buffer + the largest activation set of any pass of a step
(runner.driver.estimate: training, scoring forwards, generation's KV cache), since a step's passes run one after
another. The verdict names the biggest terms and, when the run does not fit (or only just), the cheapest change that
makes it fit. The time is an estimate: FLOPs per step over the hardware's peak at an assumed utilisation.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from runner.driver import memory as memory_
from runner.driver.estimate import Arch, pass_bytes, pass_flops
from runner.driver.show import gib
from runner.paths import is_local_path, local

GB = 1024**3
ZERO_DIR = Path(__file__).resolve().parent.parent.parent / "conf" / "zero"


def assess(cfg: DictConfig, method, configs: dict, sizes: dict, gpus_per_node: int, nodes: int, total_steps=None):
    """The plan's memory breakdown, verdict, suggested change and time estimate (a JSON-able dict)."""
    out = _memory(cfg, method, configs, sizes, gpus_per_node, nodes)
    if out["verdict"] != "fits":
        out["suggestion"] = _suggest(cfg, method, sizes, gpus_per_node, nodes, out)
    out["time"] = time_estimate(cfg, method, sizes, gpus_per_node * nodes, total_steps)
    return out


def refusal(fit: dict) -> tuple[str, str]:
    """(problem, fix) of a run whose plan does not fit."""
    terms = ", ".join(f"{k} {gib(fit['terms_gb'][k])}" for k in fit["biggest"])
    hw = fit["hardware"]
    problem = (
        f"the plan does not fit: {gib(fit['peak_gb'])} per device at its peak, on {hw['name']} "
        f"({gib(fit['capacity_gb'])} per device); the biggest terms: {terms}"
    )
    if fit["host_capacity_gb"] and fit["host_gb"] > fit["host_capacity_gb"]:
        problem += f"; and {gib(fit['host_gb'])} of CPU memory per node, of {gib(fit['host_capacity_gb'])}"
    s = fit.get("suggestion")
    fix = (
        f"the cheapest change that fits: {' '.join(s['overrides'])} ({gib(s['peak_gb'])} per device, "
        f"{s['headroom']:.0%} headroom)"
        if s
        else "more devices (deployment=single_node / multi_node) or a smaller model"
    )
    return problem, fix + "; plan.on_unfit=launch starts it anyway"


def _memory(cfg: DictConfig, method, configs: dict, sizes: dict, gpus_per_node: int, nodes: int) -> dict:
    hw = cfg.hardware
    tensor, sequence = _degrees(cfg)
    arches, num_params = _arches(cfg, method), sizes[""][0]
    if tensor > 1:  # AutoTP: each rank holds 1/tensor of every linear layer; ZeRO partitions over the data ranks
        sizes = {**sizes, "": (_tensor_share(sizes[""][0], arches[""], tensor), sizes[""][1])}
    states = memory_.run_memory(cfg, configs, sizes, max(1, gpus_per_node // tensor), nodes)
    w = 2 if cfg.precision.dtype in ("bf16", "fp16") else 4
    terms = {"runtime overhead": float(hw.overhead_gb) * GB}
    for name, e in states["engines"].items():
        terms[f"model states: {_engine(name, method)}"] = e["per_device_gb"] * GB
    prefetch = min(_prefetch(configs, cfg, w), w * sizes[""][0])  # (it never holds more than the whole model)
    if prefetch:
        terms["ZeRO-3 prefetch buffer"] = prefetch
    hpz = OmegaConf.select(cfg, "zero.zero_hpz_partition_size", default=1)
    if isinstance(hpz, int) and hpz > 1 and int(cfg.zero.stage) == 3:  # ZeRO++ hpZ: a secondary copy within a node
        terms["ZeRO++ hpZ secondary weights"] = w * sizes[""][0] / hpz
    if OmegaConf.select(cfg, "step.rollout.gathered_copy") is True:  # (runner.train.gathered)
        terms["whole copy of the policy for rollouts (step.rollout.gathered_copy)"] = w * num_params
    peak_pass, peak_terms = None, {}
    vllm = OmegaConf.select(cfg, "step.rollout.backend") == "vllm"
    for p in method.workload(cfg, gpus_per_node * nodes):
        if vllm and p.kind == "generate":  # vLLM's KV cache is inside its own share (below)
            continue
        arch = arches.get(p.engine) or arches[""]
        if sequence > 1 or tensor > 1:  # Ulysses: 1/sequence of every sequence; AutoTP: 1/tensor of the wide parts
            p = dataclasses.replace(p, seq=max(1, p.seq // sequence))
            arch = dataclasses.replace(arch, ffn=max(1, arch.ffn // tensor))
        got = pass_bytes(arch, p, w, _checkpointing(cfg, p.engine))
        if sum(got.values()) > sum(peak_terms.values()):
            peak_pass, peak_terms = p, got
    before = set(terms)
    buffers = max((e["step_buffer_gb"] * GB for e in states["engines"].values()), default=0)
    if buffers > sum(peak_terms.values()):  # the optimizer's step comes after the activations are freed
        terms["optimizer step buffer (torch AdamW)"] = buffers
    else:
        terms.update({f"{term} ({peak_pass.what})": v for term, v in peak_terms.items() if v})
    if vllm:
        _vllm_share(cfg, terms, set(terms) - before, float(hw.device_memory_gb) * GB)
    peak = sum(terms.values()) / GB
    capacity = float(hw.device_memory_gb)
    headroom = 1 - peak / capacity
    verdict = "does not fit" if headroom < 0 else "tight" if headroom < float(cfg.plan.tight_below) else "fits"
    host_need = states["per_node_cpu_gb"]
    host_cap = hw.get("host_memory_gb")
    if host_cap and host_need > float(host_cap):
        verdict = "does not fit"
    ranked = sorted(terms.items(), key=lambda kv: -kv[1])
    return {
        "hardware": {k: hw.get(k) for k in ("name", "device", "device_memory_gb", "peak_tflops", "mfu")},
        "num_params": num_params,
        "parallel": {"tensor": tensor, "sequence": sequence},
        "peak_gb": round(peak, 3),
        "capacity_gb": capacity,
        "headroom": round(headroom, 3),
        "verdict": verdict,
        "terms_gb": {k: round(v / GB, 4) for k, v in ranked},
        "biggest": [k for k, _ in ranked[:3]],
        "host_gb": round(host_need, 2),
        "host_capacity_gb": host_cap,
        "model_states": states,
    }


def _vllm_share(cfg: DictConfig, terms: dict, training: set, capacity: float) -> None:
    """vLLM's share of the device (step.rollout.backend=vllm: its weights and KV cache while it generates), beside the
    model states. Asleep (sleep_level 1/2) it frees the share while DeepSpeed trains, so the peak is the larger of
    the share and the training pass's `training` terms; awake (0) it adds to them."""
    v = cfg.step.rollout.vllm
    share = float(v.gpu_memory_utilization) * capacity
    if int(v.sleep_level) == 0:
        terms["vLLM rollout engine (awake throughout)"] = share
    elif share > sum(terms[k] for k in training):
        for k in training:
            del terms[k]
        terms["vLLM rollout engine (while it generates; asleep while training)"] = share


def _degrees(cfg: DictConfig) -> tuple[int, int]:
    """(tensor, sequence) parallel degrees (1 when the config has none)."""
    get = lambda k: OmegaConf.select(cfg, f"parallel.{k}", default=1)  # noqa: E731
    return int(get("tensor") or 1), int(get("sequence") or 1)


def _tensor_share(params: int, arch: Arch, tensor: int) -> int:
    """Parameters one rank holds under AutoTP: the embeddings whole, the blocks' linear layers 1/tensor."""
    embeddings = min(params, arch.vocab * arch.hidden)
    return int(embeddings + (params - embeddings) / tensor)


def _engine(name: str, method) -> str:
    return name or ("actor" if method.name in ("ppo", "grpo") else "policy" if method.name == "dpo" else "model")


def _checkpointing(cfg: DictConfig, engine: str) -> bool:
    role = {"": "actor", "critic": "critic"}.get(engine)
    own = OmegaConf.select(cfg, f"step.{role}.gradient_checkpointing") if role else None
    return bool(own if own is not None else cfg.train.gradient_checkpointing)


def _prefetch(configs: dict, cfg: DictConfig, w: int) -> float:
    """ZeRO-3's prefetch bucket of gathered parameters (DeepSpeed's default 5e7 elements; `auto` = 0.9 h^2)."""
    zero = configs.get("", {}).get("zero_optimization", {})
    if zero.get("stage") != 3:
        return 0.0
    size = zero.get("stage3_prefetch_bucket_size", 5e7)
    if size == "auto":
        size = 0.9 * Arch.of(OmegaConf.to_container(cfg.model.arch, resolve=True)).hidden ** 2
    return float(size) * w


def _arches(cfg: DictConfig, method) -> dict[str, Arch]:
    """Each engine's architecture: the trained model's, or the config.json of the model another engine loads."""
    dropout = cfg.model.get("dropout")
    own = Arch.of(OmegaConf.to_container(cfg.model.arch, resolve=True) if cfg.model.get("arch") else {}, dropout)
    out = {"": own}
    for name, src in method.engine_sources(cfg).items():
        path = local(str(src)) / "config.json" if src and is_local_path(str(src)) else None
        if path is not None and path.is_file():
            out[name] = Arch.of(json.loads(path.read_text()))
    return out


# ----------------------------------------------------------------------------------------- the cheapest change


def _zero_option(name: str) -> dict:
    """A conf/zero option's keys, its defaults chain merged."""
    raw = OmegaConf.to_container(OmegaConf.load(ZERO_DIR / f"{name}.yaml"))
    base: dict = {}
    for parent in raw.pop("defaults", []):
        if isinstance(parent, str) and parent != "_self_":
            base = _merge(base, _zero_option(parent))
    return _merge(base, raw)


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _dimensions(cfg: DictConfig, world: int) -> list[list[tuple[int, list[str], object]]]:
    """What may change, per dimension: (cost, overrides to print, edit of a config copy), "no change" first. The
    cost ranks the changes by what they take from speed: a higher ZeRO stage little (more so stage 3), gradient
    checkpointing a third of the compute, each halving of the micro-batch some efficiency, offload the most."""
    zero_keys = ["zero"] + [f"step.{r}.zero" for r in ("actor", "critic") if OmegaConf.select(cfg, f"step.{r}.zero")]
    stage = max(int(OmegaConf.select(cfg, f"{k}.stage")) for k in zero_keys)

    def zero_to(option, cost):
        def edit(c):
            for k in zero_keys:
                OmegaConf.update(c, k, _zero_option(option), merge=False)

        return cost, [("zero" if k == "zero" else f"zero@{k}") + f"={option}" for k in zero_keys], edit

    zero = [(0, [], None)]
    if world > 1:
        zero += [zero_to(f"stage{s}", s - stage + (s == 3)) for s in range(stage + 1, 4)]
    zero += [zero_to(o, c) for o, c in (("stage2_offload", 5), ("stage3_offload", 7)) if not (stage == 3 and c == 5)]
    dims = [zero]
    keys = ["train.gradient_checkpointing"] + [
        f"step.{r}.gradient_checkpointing" for r in ("actor", "critic") if OmegaConf.select(cfg, f"step.{r}")
    ]
    if not any(OmegaConf.select(cfg, k) for k in keys):
        dims.append(
            [(0, [], None), (3, [f"{k}=true" for k in keys], lambda c: [OmegaConf.update(c, k, True) for k in keys])]
        )
    micro, gas, batch = int(cfg.train.micro_batch_size), int(cfg.train.gradient_accumulation_steps), [(0, [], None)]
    for halvings in range(1, 4):
        m = micro >> halvings
        if m < 1 or micro % (1 << halvings):
            break
        g = gas << halvings
        batch.append(
            (
                halvings,
                [f"train.micro_batch_size={m}", f"train.gradient_accumulation_steps={g}"],
                lambda c, m=m, g=g: c.train.update(micro_batch_size=m, gradient_accumulation_steps=g),
            )
        )
    dims.append(batch)
    return dims


def _suggest(cfg: DictConfig, method, sizes: dict, gpus_per_node: int, nodes: int, now: dict) -> dict | None:
    """The cheapest combination of changes (see _dimensions) under which the plan fits; the larger headroom breaks
    a tie."""
    world = gpus_per_node * nodes
    best = None
    for combo in itertools.product(*_dimensions(cfg, world)):
        cost = sum(c for c, _, _ in combo)
        if not cost or (best and cost > best[0]):
            continue
        trial = copy.deepcopy(cfg)
        for _, _, edit in combo:
            if edit:
                edit(trial)
        got = _memory(
            trial, method, method.engine_configs(trial, world, 1, "/nonexistent"), sizes, gpus_per_node, nodes
        )
        if got["verdict"] == "fits" and (best is None or (cost, -got["headroom"]) < (best[0], -best[1]["headroom"])):
            best = (cost, got, [o for _, overrides, _ in combo for o in overrides])
    if best is None:
        return None
    return {
        "overrides": best[2],
        "peak_gb": best[1]["peak_gb"],
        "headroom": best[1]["headroom"],
        "host_gb": best[1]["host_gb"],
    }


# ----------------------------------------------------------------------------------------------------- time


def time_estimate(cfg: DictConfig, method, sizes: dict, world: int, total_steps) -> dict:
    hw = cfg.hardware
    tensor, sequence = _degrees(cfg)
    data_ranks = max(1, world // (tensor * sequence))  # each tensor/sequence group shares one batch's work
    flops, tokens = 0.0, 0.0
    for p in method.workload(cfg, world):
        n = (sizes.get(p.engine) or sizes[""])[0]
        f = pass_flops(n, p) * p.times
        if p.kind == "train" and _checkpointing(cfg, p.engine):
            f *= 4 / 3  # the forward pass runs twice
        flops += f
        if p.kind == "train" and not p.engine:
            tokens += p.batch * p.seq * p.times
    if not hw.peak_tflops or not hw.mfu:
        return {"estimate": None, "why": "set hardware.peak_tflops and hardware.mfu for a time estimate"}
    step_s = flops / (tensor * sequence) / (float(hw.peak_tflops) * 1e12 * float(hw.mfu))
    return {
        "step_s": step_s,
        "tokens_per_s": tokens * data_ranks / step_s if step_s else None,
        "run_s": step_s * total_steps if total_steps else None,
        "flops_per_step_per_device": flops / (tensor * sequence),
        "assumption": f"{hw.mfu:.0%} of {hw.peak_tflops} TFLOP/s per device; communication and offload not modelled",
    }
