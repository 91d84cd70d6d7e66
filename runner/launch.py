"""The launcher command a user would type for a deployment, and the hostfile arithmetic behind world sizes.

Ranks are always started on `python -m runner.worker <run_dir>`: they read the run directory and never parse Hydra's
command line, so DeepSpeed's `--local_rank` argument is switched off with `--no_local_rank` (ranks read LOCAL_RANK,
RANK and WORLD_SIZE from the environment, as torchrun sets them too).
"""
from __future__ import annotations

import os
import shlex
import socket
from collections import OrderedDict
from pathlib import Path

from omegaconf import DictConfig

from runner.errors import ConfigError

WORKER = "runner.worker"


def parse_hostfile(path: str) -> "OrderedDict[str, int]":
    """MPI-style hostfile (`worker-1 slots=8`), as DeepSpeed's launcher reads it."""
    hosts: OrderedDict[str, int] = OrderedDict()
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError("deployment.hostfile", f"cannot read hostfile {path!r} ({exc.strerror})",
                          "write one line per node, e.g. `worker-1 slots=8`, and pass deployment.hostfile=PATH") from None
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = [p for p in parts[1:] if p.startswith("slots=")]
        if len(parts) != 2 or not slots or not slots[0][6:].isdigit():
            raise ConfigError("deployment.hostfile", f"{path}:{number}: expected `HOST slots=N`, got {line!r}",
                              "write one line per node, e.g. `worker-1 slots=8`")
        if parts[0] in hosts:
            raise ConfigError("deployment.hostfile", f"{path}:{number}: host {parts[0]!r} is listed twice")
        hosts[parts[0]] = int(slots[0][6:])
    if not hosts:
        raise ConfigError("deployment.hostfile", f"hostfile {path!r} lists no hosts", "add lines like `worker-1 slots=8`")
    return hosts


def _parse_node_spec(spec: str, hosts: "OrderedDict[str, int]", key: str) -> dict[str, list[int]]:
    chosen: dict[str, list[int]] = {}
    for node in spec.split("@"):
        name, _, slots = node.partition(":")
        if name not in hosts:
            raise ConfigError(key, f"host {name!r} is not in the hostfile (hosts: {', '.join(hosts)})")
        chosen[name] = [int(s) for s in slots.split(",")] if slots else list(range(hosts[name]))
    return chosen


def active_slots(deployment: DictConfig, hosts: "OrderedDict[str, int]") -> "OrderedDict[str, list[int]]":
    """The slots DeepSpeed's launcher will use after --include/--exclude/--num_nodes/--num_gpus."""
    if deployment.include and deployment.exclude:
        raise ConfigError("deployment.include", "include and exclude are mutually exclusive", "set only one of them")
    pool: OrderedDict[str, list[int]] = OrderedDict((h, list(range(n))) for h, n in hosts.items())
    if deployment.include:
        inc = _parse_node_spec(deployment.include, hosts, "deployment.include")
        pool = OrderedDict((h, s) for h, s in pool.items() if h in inc)
        pool = OrderedDict((h, [x for x in s if x in inc[h]]) for h, s in pool.items())
    if deployment.exclude:
        exc = _parse_node_spec(deployment.exclude, hosts, "deployment.exclude")
        pool = OrderedDict((h, [x for x in s if x not in exc.get(h, [])]) for h, s in pool.items())
        pool = OrderedDict((h, s) for h, s in pool.items() if s)
    if deployment.num_nodes:
        pool = OrderedDict(list(pool.items())[: int(deployment.num_nodes)])
    if deployment.num_gpus:
        pool = OrderedDict((h, s[: int(deployment.num_gpus)]) for h, s in pool.items())
    if not pool:
        raise ConfigError("deployment", "no hosts or slots are left after include/exclude/num_nodes/num_gpus")
    return pool


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env(deployment: DictConfig) -> dict[str, str]:
    """Environment variables the ranks need, set by the runner (never secrets: those stay in the caller's env)."""
    env = {"DS_ACCELERATOR": deployment.accelerator, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if deployment.threads_per_rank:
        env["OMP_NUM_THREADS"] = str(deployment.threads_per_rank)
    return env


def launcher_command(deployment: DictConfig, run_dir: str) -> list[str]:
    """The exact command line that starts the ranks, as a user would type it."""
    worker = ["--module", WORKER, run_dir]
    if deployment.launcher == "torchrun":
        cmd = ["torchrun"]
        if int(deployment.nnodes) == 1 and not deployment.rdzv_endpoint:
            cmd += ["--standalone", "--nnodes", "1"]
        else:
            cmd += ["--nnodes", str(deployment.nnodes), "--rdzv_backend", deployment.rdzv_backend,
                    "--rdzv_endpoint", deployment.rdzv_endpoint, "--rdzv_id", str(deployment.rdzv_id)]
        return cmd + ["--nproc_per_node", str(deployment.nproc_per_node), "-m", WORKER, run_dir]

    cmd = ["deepspeed"]
    if deployment.name == "multi_node":
        cmd += ["--hostfile", deployment.hostfile, "--launcher", deployment.multinode_launcher]
        if deployment.launcher_args:
            cmd += ["--launcher_args", deployment.launcher_args]
        if deployment.include:
            cmd += ["--include", deployment.include]
        if deployment.exclude:
            cmd += ["--exclude", deployment.exclude]
        if deployment.num_nodes:
            cmd += ["--num_nodes", str(deployment.num_nodes)]
        if deployment.num_gpus:
            cmd += ["--num_gpus", str(deployment.num_gpus)]
        if deployment.master_addr:
            cmd += ["--master_addr", deployment.master_addr]
    else:
        cmd += ["--num_gpus", str(deployment.nproc_per_node)]
    cmd += ["--master_port", str(deployment.master_port), "--no_local_rank"]
    return cmd + worker


def launch_script(cmd: list[str], env: dict[str, str], cwd: str) -> str:
    exports = " \\\n  ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    return ("#!/usr/bin/env bash\n"
            "# The exact command this run was launched with; run this file to launch it again.\n"
            f"cd {shlex.quote(cwd)}\n"
            f"export {exports}\n"
            f"exec {shlex.join(cmd)}\n")


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
