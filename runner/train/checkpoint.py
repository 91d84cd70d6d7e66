"""DeepSpeed checkpoints of every trained engine of a run (saved every N steps, the last K kept, resumed), and the
final Hugging Face export.

Layout: the run's first (main) engine under checkpoints/<tag>/, any other trained engine (PPO's critic) under
checkpoints/<name>/<tag>/; beside the main engine's files, the runner's state (client state) and each rank's RNG
and per-rank state (rank<r>.pt).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from runner.train.engine import Dist


def _folders(ckpt_dir: Path, engines: dict) -> list[Path]:
    return [ckpt_dir if i == 0 else ckpt_dir / name for i, name in enumerate(engines)]


def save(
    engines: dict,
    run_dir: Path,
    step: int,
    state: dict,
    rank_state: dict,
    keep_last: int,
    dist: Dist,
    tag: str | None = None,
) -> Path:
    """engine.save_checkpoint of every engine (model, optimizer, scheduler, ZeRO partitions) under one tag, with the
    runner's `state` (the same on every rank) and this rank's RNG and `rank_state`. Tagged `stepN` (the `latest`
    one is what resume loads; the last `keep_last` are kept), or `best` (kept beside them, never resumed from)."""
    import deepspeed.comm as dist_comm

    ckpt_dir = run_dir / "checkpoints"
    tag = tag or f"step{step}"
    folders = _folders(ckpt_dir, engines)
    for folder, engine in list(zip(folders, engines.values()))[1:]:  # the other engines first, the main one last
        engine.save_checkpoint(str(folder), tag=tag, save_latest=tag != "best")
    main = next(iter(engines.values()))
    main.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"runner": state}, save_latest=tag != "best")
    rng = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    torch.save({"rng": rng, **rank_state}, ckpt_dir / tag / f"rank{dist.rank}.pt")
    dist_comm.barrier()
    if dist.main and keep_last > 0:
        for folder in folders:
            tags = sorted((p for p in folder.glob("step*") if p.is_dir()), key=lambda p: int(p.name[4:]))
            for old in tags[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    dist_comm.barrier()
    return ckpt_dir / tag


def load(engines: dict, run_dir: Path, dist: Dist) -> tuple[dict, dict]:
    """Load the latest checkpoint into every engine; restore this rank's RNG; return (the runner's state, this
    rank's state)."""
    ckpt_dir = run_dir / "checkpoints"
    tag = (ckpt_dir / "latest").read_text().strip()
    state = None
    for folder, (name, engine) in zip(_folders(ckpt_dir, engines), engines.items()):
        path, client = engine.load_checkpoint(str(folder), tag=tag)
        if path is None:
            raise RuntimeError(f"no loadable {name} checkpoint {tag} under {folder}")
        state = client["runner"] if state is None else state
    rank_state = torch.load(ckpt_dir / tag / f"rank{dist.rank}.pt", weights_only=False)
    rng = rank_state.pop("rng")
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state, rank_state


def full_state_dict(engine, prefix: str = "") -> dict | None:
    """The whole model's weights on rank 0 (gathered layer by layer under ZeRO-3), None on other ranks; keys
    starting with `prefix` have it removed (a wrapper's attribute name)."""
    import deepspeed.comm as dist_comm

    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank must call it
    else:
        state = engine.module.state_dict() if dist_comm.get_rank() == 0 else None  # only rank 0 writes
    if state is None:
        return None
    return {k[len(prefix) :] if k.startswith(prefix) else k: v.detach().cpu().clone() for k, v in state.items()}


_FROM_ENGINE = object()


def export_hf(
    engine, tokenizer, out_dir: Path, dist: Dist, info: dict, lora=None, lora_r: int = 0, state=_FROM_ENGINE
) -> Path:
    """A Hugging Face directory (config, safetensors weights, tokenizer) that from_pretrained loads. A wrapped
    model (e.g. modeling.ScalarHeadModel, whose transformers model is `.hf`) is saved as the model it wraps; LoRA
    adapters are merged into the weights. `state` (rank 0) replaces the engine's weights (e.g. an EMA)."""
    from runner.modeling import merge_lora

    wrapped = hasattr(engine.module, "hf")
    if state is _FROM_ENGINE:
        state = full_state_dict(engine, prefix="hf." if wrapped else "")
    if state is not None and lora_r:
        state = merge_lora(state, lora, lora_r)
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        module = engine.module.hf if wrapped else engine.module
        module.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
        (out_dir / "runner_export.json").write_text(json.dumps(info, indent=2) + "\n")
    import deepspeed.comm as dist_comm

    dist_comm.barrier()
    return out_dir


def export_model(engine, tokenizer, run_dir: Path, dist: Dist, cfg, info: dict) -> dict[str, Path]:
    """The export of a method that trains one model (the run's `lora` settings): {"export_dir": run_dir/export}."""
    info = {**info, "run_dir": str(run_dir)}
    return {"export_dir": export_hf(engine, tokenizer, run_dir / "export", dist, info, cfg.lora, cfg.lora.r)}
