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
            f"per device: {memory['per_device_gb']:.2f} GiB   per node (CPU): {memory['per_node_cpu_gb']:.2f} GiB"
        )
    for note in notes:
        print(f"note: {note}")
