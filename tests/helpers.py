"""Helpers every test module shares: the real CLI end to end (through the real launcher) and what a run wrote,
DeepSpeed's own config parser, fake hardware for planning, stand-in exports, data files."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

from runner import ASSETS
from runner.driver.plan import Hardware

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
TINY_TRAIN = ASSETS / "tiny_data" / "train.jsonl"
TINY_TOKENIZER = ASSETS / "tiny_tokenizer"

GPU = Hardware(cuda_devices=8, bf16=True, cpus=2)  # one node of 8 bf16-capable GPUs
CPU = Hardware(cuda_devices=0, bf16=False, cpus=2)  # a 2-core machine without GPUs

# Few steps, small evaluations: enough for the tiny model's loss to fall clearly on 2 CPU cores (conf/debug/quick.yaml).
QUICK = ["debug=quick"]


def run_cli(cwd: Path, *overrides: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    proc = subprocess.run(
        [sys.executable, "-m", "runner", *overrides], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"runner failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_dir_of(proc: subprocess.CompletedProcess) -> Path:
    match = re.search(r"^run directory: (.+)$", proc.stdout, re.MULTILINE)
    assert match, proc.stdout
    return Path(match.group(1))


PROGRESS_BAR = re.compile(r"^\S+:\s+\d+%\|")  # tqdm's `sft:  50%|█████     | 20/40 ...`


def console_lines(text: str) -> tuple[list[str], list[str]]:
    """What a terminal shows of a command's output: (lines, progress-bar lines), blank lines left out (a bar's redraw
    and its clearing are lines of their own once captured)."""
    shown = [line.rstrip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return [x for x in shown if not PROGRESS_BAR.match(x)], [x for x in shown if PROGRESS_BAR.match(x)]


def metrics(run_dir: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def checkpoint_state(run_dir: Path) -> dict:
    """The fp32 weights of a run's latest DeepSpeed checkpoint, whatever its ZeRO stage."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = run_dir / "checkpoints"
    if json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"] == 0:
        tag = (ckpt / "latest").read_text().strip()
        return torch.load(ckpt / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt))


def ds_parse(ds: dict, world_size: int):
    """DeepSpeed's own config parser, with its world size (normally from torch.distributed) set to `world_size`."""
    from deepspeed.runtime.config import DeepSpeedConfig

    with (
        mock.patch("deepspeed.runtime.config.dist.get_world_size", return_value=world_size),
        mock.patch("deepspeed.runtime.config.dist.get_rank", return_value=0),
    ):
        parsed = DeepSpeedConfig(copy.deepcopy(ds))
    # the patch reached it (it silently falls back to 1 otherwise); Ulysses' ranks of one sequence count once
    assert parsed.world_size == world_size / ds.get("sequence_parallel_size", 1)
    return parsed


def fake_exports() -> tuple[Path, Path]:
    """An SFT-like and a reward-like export of the tiny model (config, tokenizer, runner_export.json, a safetensors
    file that holds no tensor: planning reads only headers), for planning methods that read exports."""
    import shutil
    import tempfile

    from omegaconf import OmegaConf

    root = Path(tempfile.gettempdir()) / f"runner-fake-exports-v3-{os.getpid()}"
    for kind, arch in (("causal_lm", "OPTForCausalLM"), ("reward_model", "OPTForSequenceClassification")):
        out = root / kind
        if not out.exists():
            shutil.copytree(TINY_TOKENIZER, out)
            arch_cfg = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "tiny.yaml").arch)
            (out / "config.json").write_text(json.dumps({**arch_cfg, "architectures": [arch], "num_labels": 1}))
            (out / "runner_export.json").write_text(json.dumps({"kind": kind}))
            (out / "model.safetensors").write_bytes(b"\x02" + b"\x00" * 7 + b"{}")  # a stand-in: no tensors
    return root / "causal_lm", root / "reward_model"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def wandb_history(run_dir: Path) -> dict[int, set[str]]:
    """The metrics a wandb offline run recorded, by step: read from its .wandb file (LevelDB-style log records of
    wandb's protobuf Record messages)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, buf, steps = path.read_bytes(), 7, b"", {}
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
                steps.setdefault(int(items["_step"]), set()).update(k for k in items if not k.startswith("_"))
    return steps


def tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of a run's TensorBoard log: tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (folder,) = {p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def adamw(lr: float, weight_decay: float = 0.0, no_decay=("bias",), fused: bool = True):
    """The optimizer keys runner.train.engine.initialize reads: torch's AdamW, betas (0.9, 0.95), eps 1e-8."""
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {
            "name": "AdamW",
            "impl": "torch",
            "lr": lr,
            "betas": [0.9, 0.95],
            "eps": 1e-8,
            "weight_decay": weight_decay,
            "no_decay": list(no_decay),
            "fused": fused,
        }
    )


def tiny_model():
    """conf/model/tiny.yaml as the model group of a run built from its architecture: no weights, no dropout."""
    from omegaconf import OmegaConf

    model = OmegaConf.load(CONF / "model" / "tiny.yaml")
    model.path, model.dropout = None, 0.0
    return model


def spawn_rank(target) -> dict:
    """`target(port, queue)` in a fresh process (its own process group on a free port); what it put on the queue."""
    return spawn_ranks(target, 1)[0]


def spawn_ranks(target, world: int) -> list:
    """`target(port, queue, rank, world)` in `world` fresh processes sharing a free port (one process group);
    what each put on the queue, by rank (each puts one (rank, value) pair; a 1-process target takes (port, queue))."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    args = [(port, queue)] if world == 1 else [(port, queue, rank, world) for rank in range(world)]
    procs = [ctx.Process(target=target, args=a) for a in args]
    for proc in procs:
        proc.start()
    got = [queue.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    return got if world == 1 else [value for _, value in sorted(got, key=lambda pair: pair[0])]
