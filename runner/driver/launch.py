"""The launcher command a user would type for a deployment, and the hostfile arithmetic behind world sizes.

Ranks are always started on `python -m runner.worker <run_dir>`: they read the run directory and never parse Hydra's
command line, so DeepSpeed's `--local_rank` argument is switched off with `--no_local_rank` (ranks read LOCAL_RANK,
RANK and WORLD_SIZE from the environment, as torchrun sets them too).
"""

from __future__ import annotations

import os
import shlex
import socket
from collections import OrderedDict  # noqa: F401  (type hints)
from pathlib import Path

from omegaconf import DictConfig

from runner.errors import ConfigError

WORKER = "runner.worker"


def parse_hostfile(path: str) -> OrderedDict[str, int]:
    """MPI-style hostfile (`worker-1 slots=8`), parsed by DeepSpeed's launcher's own function."""
    from deepspeed.launcher.runner import _parse_hostfile

    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(
            "deployment.hostfile",
            f"cannot read hostfile {path!r} ({exc.strerror})",
            "write one line per node, e.g. `worker-1 slots=8`, and pass deployment.hostfile=PATH",
        ) from None
    try:
        return _parse_hostfile(lines)
    except ValueError as exc:
        raise ConfigError(
            "deployment.hostfile", f"{path}: {exc}", "write one line per node: `worker-1 slots=8`"
        ) from None


def active_slots(deployment: DictConfig, hosts: OrderedDict[str, int]) -> OrderedDict[str, list[int]]:
    """The slots DeepSpeed's launcher will use for this deployment, computed with the launcher's own functions and
    checked against what the chosen multi-node backend supports."""
    from deepspeed.launcher import multinode_runner as backends
    from deepspeed.launcher.runner import apply_num_nodes_and_gpus, parse_args, parse_inclusion_exclusion

    args = parse_args(launcher_command(deployment, "RUN_DIR")[1:])
    classes = {
        "pdsh": backends.PDSHRunner,
        "openmpi": backends.OpenMPIRunner,
        "mpich": backends.MPICHRunner,
        "impi": backends.IMPIRunner,
        "mvapich": backends.MVAPICHRunner,
        "slurm": backends.SlurmRunner,
    }
    if args.launcher not in classes:
        raise ConfigError(
            "deployment.multinode_launcher", f"unknown launcher {args.launcher!r}", f"use one of {', '.join(classes)}"
        )
    try:
        if (args.num_nodes >= 0 or args.num_gpus >= 0) and (args.include or args.exclude):
            raise ValueError("num_nodes/num_gpus cannot be combined with include/exclude")
        active = parse_inclusion_exclusion(hosts, args.include, args.exclude)
        active = apply_num_nodes_and_gpus(active, args.num_nodes, args.num_gpus)
        active = type(active)((h, s) for h, s in active.items() if s)
        if not active:
            raise ValueError("no hosts or slots are left")
        cls = classes[args.launcher]
        cls.validate_active_resources(active)
        backend = cls(args, "", hosts) if cls is not backends.PDSHRunner else cls(args, "")
        backend.validate_args()
    except ValueError as exc:
        raise ConfigError(
            "deployment",
            f"DeepSpeed's {args.launcher} launcher refuses this selection: {exc}",
            "check deployment.include/exclude/num_nodes/num_gpus against the hostfile",
        ) from None
    return active


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env(deployment: DictConfig) -> dict[str, str]:
    """Environment variables the ranks need, set by the runner (never secrets: those stay in the caller's env)."""
    env = {"DS_ACCELERATOR": deployment.accelerator, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if deployment.threads_per_rank:
        env["OMP_NUM_THREADS"] = str(deployment.threads_per_rank)
        if deployment.accelerator == "cpu" and int(deployment.threads_per_rank) > 1 and deployment.omp_wait_policy:
            env["OMP_WAIT_POLICY"] = str(deployment.omp_wait_policy).upper()  # (see conf/deployment/cpu.yaml)
    return env


def launcher_command(deployment: DictConfig, run_dir: str, script: str | None = None) -> list[str]:
    """The exact command line that starts the ranks, as a user would type it; `script`: a Python file the ranks run
    (with the run directory as its argument) instead of runner.worker (runner.api)."""
    worker = [script, run_dir] if script else ["--module", WORKER, run_dir]
    if deployment.launcher == "torchrun":
        cmd = ["torchrun"]
        if int(deployment.nnodes) == 1 and not deployment.rdzv_endpoint:
            cmd += ["--standalone", "--nnodes", "1"]
        else:
            cmd += [
                "--nnodes",
                str(deployment.nnodes),
                "--rdzv_backend",
                deployment.rdzv_backend,
                "--rdzv_endpoint",
                deployment.rdzv_endpoint,
                "--rdzv_id",
                str(deployment.rdzv_id),
            ]
        module = [script] if script else ["-m", WORKER]
        return cmd + ["--nproc_per_node", str(deployment.nproc_per_node), *module, run_dir]

    cmd = ["deepspeed"]
    if deployment.name == "multi_node":
        cmd += ["--hostfile", deployment.hostfile, "--launcher", deployment.multinode_launcher]
        if deployment.launcher_args:  # one token: values starting with "-" must not look like the launcher's own flags
            cmd += [f"--launcher_args={deployment.launcher_args}"]
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
    elif deployment.get("include"):
        cmd += ["--include", deployment.include]
    elif not deployment.get("all_visible"):  # without it DeepSpeed uses every visible GPU (CUDA_VISIBLE_DEVICES)
        cmd += ["--num_gpus", str(deployment.nproc_per_node)]
    cmd += ["--master_port", str(deployment.master_port), "--no_local_rank"]
    return cmd + worker


def launch_script(cmd: list[str], env: dict[str, str], cwd: str) -> str:
    exports = " \\\n  ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    return (
        "#!/usr/bin/env bash\n"
        "# The exact command this run was launched with; run this file to launch it again.\n"
        f"cd {shlex.quote(cwd)}\n"
        f"export {exports}\n"
        f"exec {shlex.join(cmd)}\n"
    )


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM node list (`gpu[01-03,07],login1`) as `scontrol show hostnames` does."""
    hosts, depth, token = [], 0, ""
    parts = []
    for ch in nodelist:  # split on commas outside brackets
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(token)
            token = ""
        else:
            token += ch
    parts.append(token)
    for part in filter(None, parts):
        if "[" not in part:
            hosts.append(part)
            continue
        prefix, ranges = part[: part.index("[")], part[part.index("[") + 1 : part.index("]")]
        suffix = part[part.index("]") + 1 :]
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(n).zfill(len(lo))}{suffix}")
    return hosts
