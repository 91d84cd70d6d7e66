"""The machine a run is planned for (the `hardware` group): a preset, or `auto`, resolved against what is visible.

auto on a host with GPUs reads their name and memory from nvidia-smi and takes the peak speed of the preset whose
device it names; deployment=cpu is this host (its memory shared by the ranks); a GPU plan on a host without GPUs
assumes `hardware.assume` and says so. Nothing here imports torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from runner.driver.deployment import Hardware, nvidia_smi
from runner.errors import ConfigError

PRESETS = Path(__file__).resolve().parent.parent.parent / "conf" / "hardware"
KEYS = ("device", "device_memory_gb", "bf16", "fp16", "peak_tflops", "devices_per_node", "host_memory_gb")
KEYS += ("interconnect", "mfu", "overhead_gb")
MATCH = {"A100": "a100-80g", "H100": "h100-80g", "H200": "h200", "L40S": "l40s", "A10": "a10-24g"}
MATCH |= {"4090": "rtx4090", "3090": "rtx3090"}


def preset(name: str) -> dict:
    """A preset's values (conf/hardware/<name>.yaml, without its defaults list)."""
    path = PRESETS / f"{name}.yaml"
    if name in ("auto", "") or not path.is_file():
        known = sorted(p.stem for p in PRESETS.glob("*.yaml") if p.stem != "auto")
        raise ConfigError("hardware.assume", f"unknown hardware preset {name!r}", f"use one of {', '.join(known)}")
    values = OmegaConf.to_container(OmegaConf.load(path))
    return {k: v for k, v in values.items() if k in KEYS}


def resolve(cfg: DictConfig, hw: Hardware, notes: list[str]) -> None:
    """Fill every null of cfg.hardware for this run's accelerator; check the values."""
    h, accelerator = cfg.hardware, cfg.deployment.accelerator
    if accelerator == "cpu":
        if h.name not in ("auto", "cpu"):
            raise ConfigError(
                "hardware",
                f"hardware={h.name} describes GPUs, and deployment={cfg.deployment.name} runs on this host's CPU",
                "plan for those GPUs with a GPU deployment (e.g. deployment=single_node), or use hardware=cpu",
            )
        _fill(h, {**preset("cpu"), **_this_host()})
        ranks = int(cfg.deployment.nproc_per_node)
        h.name = "cpu"
        h.device_memory_gb = round(float(h.host_memory_gb) / ranks, 2)  # the ranks of a node share its memory
        if ranks > 1:
            notes.append(
                f"hardware: this host's {h.host_memory_gb} GiB are shared by {ranks} ranks: "
                f"{h.device_memory_gb} GiB each"
            )
    elif h.name == "auto":
        found = _visible_gpus() if hw.cuda_devices else []
        if found:
            name, mem = found[0]
            match = next((p for key, p in MATCH.items() if key in name), None)
            _fill(h, {**(preset(match) if match else {}), "device": name, "device_memory_gb": mem})
            h.devices_per_node = len(found)
            if not match:
                notes.append(f"hardware: no preset for {name}: set hardware.peak_tflops for a time estimate")
        else:
            _fill(h, preset(str(h.assume)))
            notes.append(
                f"hardware=auto: no GPU is visible here, so the plan assumes hardware={h.assume} ({h.device}); "
                "choose the GPUs you will run on with hardware=<preset> (conf/hardware)"
            )
            h.name = str(h.assume)
    for key in ("device_memory_gb", "overhead_gb"):
        value = h.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"hardware.{key}", f"must be a positive number (GiB), got {value!r}")
    if h.mfu is not None and not (isinstance(h.mfu, (int, float)) and 0 < h.mfu <= 1):
        raise ConfigError("hardware.mfu", f"must be a fraction in (0, 1], got {h.mfu!r}", "e.g. hardware.mfu=0.35")


def _fill(h: DictConfig, values: dict) -> None:
    for key, value in values.items():
        if h.get(key) is None:
            h[key] = value


def _this_host() -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "device": f"this host's CPU ({cores} cores)",
        "host_memory_gb": memory or 16.0,
        "peak_tflops": round(cores * 2.5e9 * 32 / 1e12, 3),
    }


def _visible_gpus() -> list[tuple[str, float]]:
    """(name, memory in GiB) of each visible GPU, from nvidia-smi ([] when it cannot say)."""
    return [(name, round(float(mem) / 1024, 1)) for name, mem in nvidia_smi("name,memory.total") or []]
