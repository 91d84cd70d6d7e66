"""DeepSpeed checkpoints (save every N steps, keep the last K, resume) and the final Hugging Face export."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from runner.engine import Dist


def save(engine, run_dir: Path, step: int, state: dict, keep_last: int, dist: Dist, tag: str | None = None,
         others: dict | None = None, rank_files: dict | None = None) -> Path:
    """engine.save_checkpoint (model, optimizer, scheduler, ZeRO partitions) + the loop state and every rank's RNG.
    Tagged `stepN` (the `latest` one is what resume loads; the last `keep_last` are kept), or `best` (kept beside
    them, never what resume loads). `others` (name -> engine, e.g. PPO's critic) are saved under checkpoints/<name>
    with the same tag; `rank_files` (name -> object) are saved per rank in the tag's directory."""
    import deepspeed.comm as dist_comm

    ckpt_dir = run_dir / "checkpoints"
    tag = tag or f"step{step}"
    for name, other in (others or {}).items():
        other.save_checkpoint(str(ckpt_dir / name), tag=tag, save_latest=tag != "best")
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"loop": state}, save_latest=tag != "best")
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    torch.save(rng, ckpt_dir / tag / f"rng_rank{dist.rank}.pt")
    for name, obj in (rank_files or {}).items():
        torch.save(obj, ckpt_dir / tag / f"{name}_rank{dist.rank}.pt")
    dist_comm.barrier()
    if dist.main and keep_last > 0:
        for folder in [ckpt_dir] + [ckpt_dir / name for name in (others or {})]:
            tags = sorted((p for p in folder.glob("step*") if p.is_dir()), key=lambda p: int(p.name[4:]))
            for old in tags[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    dist_comm.barrier()
    return ckpt_dir / tag


def resume(engine, run_dir: Path, dist: Dist, others: dict | None = None, rank_files: tuple = ()) -> dict:
    """Load the latest checkpoint into the engine (and `others` from the same tag); return the loop state saved with
    it, with the per-rank objects named in `rank_files` under their names."""
    ckpt_dir = run_dir / "checkpoints"
    tag = (ckpt_dir / "latest").read_text().strip()
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"no loadable checkpoint {tag} under {ckpt_dir}")
    for name, other in (others or {}).items():
        loaded, _ = other.load_checkpoint(str(ckpt_dir / name), tag=tag)
        if loaded is None:
            raise RuntimeError(f"no {name} checkpoint {tag} under {ckpt_dir / name}")
    tag_dir = ckpt_dir / tag
    rng = torch.load(tag_dir / f"rng_rank{dist.rank}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = dict(client["loop"])
    for name in rank_files:
        state[name] = torch.load(tag_dir / f"{name}_rank{dist.rank}.pt", weights_only=False)
    return state


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
    return {k[len(prefix):] if k.startswith(prefix) else k: v.detach().cpu().clone() for k, v in state.items()}


_FROM_ENGINE = object()


def export_hf(engine, tokenizer, out_dir: Path, dist: Dist, info: dict, lora=None, lora_r: int = 0,
              state=_FROM_ENGINE) -> Path:
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
