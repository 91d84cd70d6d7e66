"""Where a run's ranks go: the hardware it plans for, and the deployment's world size, nodes and launcher settings
(every `auto` resolved)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from runner.driver import launch
from runner.errors import ConfigError


@dataclasses.dataclass
class Hardware:
    cuda_devices: int
    bf16: bool
    cpus: int

    @staticmethod
    def detect() -> Hardware:
        """The GPUs this process may use, without importing torch where it can (it costs the driver a second): no
        NVIDIA device node means none; else nvidia-smi's list, filtered by CUDA_VISIBLE_DEVICES; else torch."""
        cpus = launch.cpu_count()
        if not any(Path("/dev").glob("nvidia[0-9]*")) and not Path("/proc/driver/nvidia").exists():
            return Hardware(cuda_devices=0, bf16=False, cpus=cpus)
        found = _nvidia_smi()
        if found is None:
            import torch

            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            return Hardware(cuda_devices=n, bf16=bool(n) and torch.cuda.is_bf16_supported(), cpus=cpus)
        return Hardware(cuda_devices=len(found), bf16=bool(found) and min(found) >= 8.0, cpus=cpus)


def _nvidia_smi() -> list[float] | None:
    """Compute capabilities of the visible GPUs from nvidia-smi (None when it cannot say: no tool, UUIDs in
    CUDA_VISIBLE_DEVICES)."""
    rows = nvidia_smi("compute_cap")
    return None if rows is None else [float(r[0]) for r in rows]


def nvidia_smi(fields: str) -> list[list[str]] | None:
    """The visible GPUs' values of nvidia-smi's --query-gpu `fields` (comma-separated), one list per GPU in
    CUDA_VISIBLE_DEVICES order; None when it cannot say (no tool, an error, UUIDs or MIG names in
    CUDA_VISIBLE_DEVICES)."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu=index,{fields}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode:
        return None
    rows = {}
    for line in out.stdout.strip().splitlines():
        index, *values = (x.strip() for x in line.split(","))
        if values:
            rows[int(index)] = values
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(rows.values())
    try:
        return [rows[int(v)] for v in visible.split(",") if v.strip() != "" and int(v) in rows]
    except ValueError:  # UUIDs or MIG names: torch resolves those
        return None


def resolve_deployment(cfg: DictConfig, hw: Hardware, dry_run: bool, notes: list[str]) -> tuple[int, dict[str, int]]:
    dep = cfg.deployment
    if dep.name == "auto":
        dep.name = "single_node" if hw.cuda_devices else "cpu"
        dep.launcher = "deepspeed"
        notes.append(f"deployment=auto chose {dep.name} ({hw.cuda_devices} GPUs visible)")
        if dep.name == "cpu":
            dep.master_addr = "127.0.0.1"
    if dep.accelerator == "auto":
        dep.accelerator = "cuda" if hw.cuda_devices else "cpu"
    if dep.accelerator not in ("cpu", "cuda"):
        raise ConfigError("deployment.accelerator", f"unknown accelerator {dep.accelerator!r}", "use cpu or cuda")

    if dep.name == "slurm":  # inside the allocation: its nodes; planning outside it: the configured count
        nodelist = os.environ.get("SLURM_JOB_NODELIST")
        hosts = launch.slurm_hostnames(nodelist) if nodelist else []
        if hosts:
            dep.nnodes = int(os.environ.get("SLURM_NNODES", len(hosts)))
            dep.rdzv_id = os.environ.get("SLURM_JOB_ID", dep.rdzv_id)
        elif not dry_run:
            raise ConfigError(
                "deployment",
                "deployment=slurm runs inside a SLURM allocation (submitted by Hydra's "
                "submitit launcher), and this process is not in one",
                "run it without hydra/launcher=basic, or use deployment=torchrun / multi_node on this machine",
            )
        if dep.rdzv_endpoint == "auto":
            dep.rdzv_endpoint = f"{hosts[0] if hosts else 'FIRST_NODE'}:{dep.rdzv_port}"
            if not hosts:
                notes.append(
                    "deployment=slurm: the rendezvous host is the allocation's first node, known once the "
                    "job runs (FIRST_NODE in the command below)"
                )
    if dep.name == "multi_node":
        hostfile = dep.hostfile
        if os.path.exists(hostfile):
            slots = launch.active_slots(dep, launch.parse_hostfile(hostfile))
            nodes = {h: len(s) for h, s in slots.items()}
        elif dry_run:
            nodes = {f"node{i}": int(dep.plan_gpus_per_node) for i in range(int(dep.plan_nodes))}
            notes.append(
                f"hostfile {hostfile} is not on this machine: the plan assumes {dep.plan_nodes} nodes x "
                f"{dep.plan_gpus_per_node} GPUs (deployment.plan_nodes, deployment.plan_gpus_per_node)"
            )
        else:
            raise ConfigError(
                "deployment.hostfile",
                f"hostfile {hostfile!r} does not exist",
                "write one line per node (`worker-1 slots=8`) and pass deployment.hostfile=PATH",
            )
        if dep.nproc_per_node == "auto":
            dep.nproc_per_node = max(nodes.values())
        _port(dep)
        return sum(nodes.values()), nodes

    if dep.nproc_per_node == "auto":
        if dep.accelerator == "cpu":
            dep.nproc_per_node = 1
        elif hw.cuda_devices:
            dep.nproc_per_node = hw.cuda_devices
            if dep.launcher == "deepspeed":
                OmegaConf.update(dep, "all_visible", True, force_add=True)
        elif dry_run:
            dep.nproc_per_node = int(dep.plan_gpus_per_node)
            notes.append(
                f"no GPU is visible here: the plan assumes {dep.nproc_per_node} GPUs per node "
                "(deployment.plan_gpus_per_node)"
            )
        else:
            raise ConfigError(
                "deployment",
                f"deployment={dep.name} needs CUDA GPUs and none is visible",
                "use deployment=cpu on this machine",
            )
    if dep.get("include"):  # deepspeed --include localhost:0,2
        host, _, slots = str(dep.include).partition(":")
        if host != "localhost" or not slots:
            raise ConfigError(
                "deployment.include",
                f"on one node, include must be localhost:SLOTS, got {dep.include!r}",
                "e.g. deployment.include=localhost:0,2",
            )
        dep.nproc_per_node = len(slots.split(","))
    nproc = dep.nproc_per_node
    if not isinstance(nproc, int) or nproc < 1:
        raise ConfigError("deployment.nproc_per_node", f"must be a positive integer, got {nproc!r}")
    if not dry_run:
        if dep.accelerator == "cuda" and not hw.cuda_devices:
            raise ConfigError(
                "deployment",
                f"deployment={dep.name} needs CUDA GPUs and none is visible",
                "use deployment=cpu on this machine (or dry_run=true to plan for GPUs)",
            )
        if dep.accelerator == "cuda" and nproc > hw.cuda_devices:
            raise ConfigError(
                "deployment.nproc_per_node",
                f"{nproc} ranks need {nproc} GPUs, but {hw.cuda_devices} are visible",
                f"set deployment.nproc_per_node to at most {hw.cuda_devices}, or use deployment=cpu",
            )
        if dep.accelerator == "cpu" and nproc > hw.cpus:
            raise ConfigError(
                "deployment.nproc_per_node",
                f"{nproc} CPU ranks on {hw.cpus} cores",
                f"set deployment.nproc_per_node to at most {hw.cpus}",
            )
    nnodes = int(dep.get("nnodes", 1))
    if nnodes > 1 and not dep.get("rdzv_endpoint"):
        raise ConfigError(
            "deployment.rdzv_endpoint",
            f"nnodes={nnodes} needs a rendezvous endpoint",
            "set deployment.rdzv_endpoint=HOST:PORT (the same on every node)",
        )
    _port(dep)
    return nnodes * nproc, {f"node{i}": nproc for i in range(nnodes)}


# Parameters below which one torch thread per CPU rank beats several (runner SFT, tokens/s, 2 idle cores: 0.56M
# parameters 1.3-1.5x faster on one thread than on two, 3.4M even, 13M 1.25-1.45x slower; a 2-thread rank's idle
# OpenMP threads are woken for every small operation: bench/bench_threads.py)
ONE_THREAD_BELOW = 3_000_000


def resolve_threads(cfg: DictConfig, cpus: int, notes: list[str], params: Callable[[], int]) -> None:
    """deployment.threads_per_rank: auto -> on CPU ranks, one thread for a model under ONE_THREAD_BELOW parameters
    (`params()`: the trained model's count, asked only when a rank has more than one core), else the cores per rank;
    on GPUs, torch's default."""
    dep = cfg.deployment
    threads = dep.threads_per_rank
    if threads != "auto":
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise ConfigError(
                "deployment.threads_per_rank",
                f"must be a positive number of torch threads, auto or null, got {threads!r}",
                "e.g. deployment.threads_per_rank=1, or auto (by the model's size and the cores per rank)",
            )
        return
    if dep.accelerator != "cpu":
        dep.threads_per_rank = None
        return
    cores = max(1, cpus // dep.nproc_per_node)
    if cores > 1 and (n := params()) < ONE_THREAD_BELOW:
        dep.threads_per_rank = 1
        notes.append(
            f"deployment.threads_per_rank=auto chose 1 torch thread per rank, not {cores}: a model of {n:,} "
            f"parameters trains faster on one (set deployment.threads_per_rank={cores} to use every core)"
        )
    else:
        dep.threads_per_rank = cores


def _port(dep: DictConfig) -> None:
    if dep.get("master_port") == "auto":
        dep.master_port = launch.free_port()
    port = dep.get("master_port")
    if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535):
        raise ConfigError(
            "deployment.master_port",
            f"must be a port number from 1 to 65535 (or auto), got {port!r}",
            "e.g. deployment.master_port=29500, or auto for a free one",
        )
