"""What the driver prints: the plan of a dry run, and the end of a run."""

from __future__ import annotations

import json

import yaml
from omegaconf import OmegaConf


def plan(cfg, configs: dict, cmd: list[str], env: dict, memory: dict | None, notes: list[str]) -> None:
    print("# composed recipe\n" + yaml.safe_dump(OmegaConf.to_container(cfg, resolve=True), sort_keys=False).rstrip())
    for name, config in configs.items():
        main = " (the trained model's)" if not name and len(configs) > 1 else ""
        print(f"\n# ds_config{'.' + name if name else ''}.json{main}\n" + json.dumps(config, indent=2))
    print(
        "\n# launcher command\n"
        + " ".join(f"{k}={v}" for k, v in sorted(env.items()))
        + " "
        + " ".join(s if s and " " not in s else repr(s) for s in cmd)
    )
    if memory:
        print(
            f"\n# model-state memory ({memory['source']})\n"
            f"parameters: {memory['num_params']:,}   devices: {memory['devices']}\n"
            f"per device: {gib(memory['per_device_gb'])}   per node (CPU): {gib(memory['per_node_cpu_gb'])}"
        )
        engines = memory.get("engines") or {}
        for name, e in engines.items() if len(engines) > 1 else ():
            role = "trained" if e["trained"] else "frozen"
            print(
                f"  {name or 'model'} ({role}, {e['num_params']:,} parameters): {gib(e['per_device_gb'])} per "
                f"device, {gib(e['per_node_cpu_gb'])} CPU per node"
            )
    for note in notes:
        print(f"note: {note}")


def gib(value: float) -> str:
    """A size given in GiB, in GiB, or in MiB when under one."""
    return "0 GiB" if value == 0 else f"{value:.2f} GiB" if value >= 1 else f"{value * 1024:.1f} MiB"
