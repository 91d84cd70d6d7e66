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

from runner import faults, manifest
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
    runner's `state` (the same on every rank) and this rank's RNG and `rank_state`; committed by rank 0 once every
    rank is done (runner.manifest). Tagged `stepN` (the last `keep_last` are kept; `latest` names the newest), or
    `best` (kept beside them, never resumed from)."""
    import deepspeed.comm as dist_comm

    ckpt_dir = run_dir / "checkpoints"
    tag = tag or f"step{step}"
    folders = _folders(ckpt_dir, engines)
    for folder, engine in list(zip(folders, engines.values()))[1:]:  # the other engines first, the main one last
        engine.save_checkpoint(str(folder), tag=tag, save_latest=False)
    main = next(iter(engines.values()))
    main.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"runner": state}, save_latest=False)
    rng = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    torch.save({"rng": rng, **rank_state}, ckpt_dir / tag / f"rank{dist.rank}.pt")
    faults.maybe_fail("save", step, dist.rank)
    dist_comm.barrier()  # every rank's files are written
    if dist.main:
        manifest.commit(ckpt_dir, tag, step, list(engines)[1:], latest=tag != "best")
        if keep_last > 0:
            _rotate(ckpt_dir, folders, keep_last, keep=tag)
    dist_comm.barrier()
    return ckpt_dir / tag


def _rotate(ckpt_dir: Path, folders: list[Path], keep_last: int, keep: str) -> None:
    """Delete all but the newest `keep_last` complete step tags (and incomplete ones older than the newest)."""
    tags = manifest.step_tags(ckpt_dir)
    complete = [t for t in tags if manifest.is_complete(ckpt_dir, t)]
    doomed = [t for t in complete[keep_last:] if t != keep]
    doomed += [t for t in tags if t not in complete and t != keep and int(t[4:]) < int(keep[4:] or 0)]
    for tag in doomed:
        for folder in folders:
            shutil.rmtree(folder / tag, ignore_errors=True)


def load(engines: dict, run_dir: Path, resume, dist: Dist, seed: int) -> tuple[dict, dict]:
    """Load the checkpoint the driver chose (`resume`: its tag, step, the engines converted to the universal format,
    whether the ranks changed) into every engine; restore this rank's RNG; return (the runner's state, this rank's
    state). On another number of ranks each rank's random stream is derived anew from the seed and the step."""
    ckpt_dir = run_dir / "checkpoints"
    state = None
    for i, (folder, (name, engine)) in enumerate(zip(_folders(ckpt_dir, engines), engines.items())):
        converted = ("" if i == 0 else name) in resume.universal  # (the driver names the main engine's JSON "")
        tag = f"{resume.tag}-universal" if converted else resume.tag
        path, client = engine.load_checkpoint(str(folder), tag=tag)
        if path is None:
            raise RuntimeError(f"no loadable {name} checkpoint {tag} under {folder}")
        state = client["runner"] if state is None else state
    if resume.resharded:
        torch.manual_seed(seed * 1000003 + int(resume.step) * 7919 + dist.rank)
        return state, {}
    rank_state = torch.load(ckpt_dir / resume.tag / f"rank{dist.rank}.pt", weights_only=False)
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
    elif engine.autotp_size() > 1:
        state = engine._consolidated_16bit_state_dict()  # AutoTP's shards gathered (collective too)
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
    from runner.train.models import merge_lora

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
