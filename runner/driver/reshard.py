"""Convert a checkpoint tag to DeepSpeed's universal format, so that a run resumes with another number of ranks or
another ZeRO stage (`resume=RUN deployment.nproc_per_node=1 zero=stage2`). Run by the driver in a subprocess:

    python -m runner.driver.reshard CKPT_FOLDER TAG TARGET_STAGE

DeepSpeed's `ds_to_universal` does the conversion; a ZeRO-3 checkpoint loaded at ZeRO-1/2 also needs its per-
parameter files in the ZeRO-1/2 universal layout (full-shape tensors, a step file) and the ZeRO-1/2 global optimizer
state, which this module writes. The result, `<TAG>-universal`, is loaded with `checkpoint.load_universal`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def universal_tag(tag: str) -> str:
    return f"{tag}-universal"


def convert(folder: Path, tag: str, target_stage: int) -> None:
    out = folder / universal_tag(tag)
    shutil.rmtree(out, ignore_errors=True)
    tmp = folder / f".{universal_tag(tag)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(folder / tag),
        "--output_folder",
        str(tmp),
        "--inject_missing_state",
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"ds_to_universal failed on {folder / tag}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    source_stage3 = any((folder / tag).glob("zero_pp_rank_*_mp_rank_*_model_states.pt"))
    if source_stage3 and target_stage in (1, 2):
        _stage3_to_stage12(tmp)
    tmp.rename(out)


def _stage3_to_stage12(root: Path) -> None:
    """A ZeRO-3 universal folder as ZeRO-1/2 reads one: per-parameter tensors in their full shape under `param` with
    their step, the global optimizer state ZeRO-1/2 expects, and the model-states file under its ZeRO-1/2 name."""
    import deepspeed
    import torch

    model_states = root / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    states = torch.load(model_states, weights_only=False)
    shapes = {name: shape for group in states["param_shapes"] for name, shape in group.items()}
    optim = torch.load(root / "zero" / "optimizer_state.pt", weights_only=False)
    step = optim["optimizer_state_dict"]["state"][0]["step"]
    for name, shape in shapes.items():
        folder = root / "zero" / name
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            flat = torch.load(folder / f"{key}.pt", weights_only=False)
            torch.save({"param": flat.view(shape), "cat_dim": 0}, folder / f"{key}.pt")
        torch.save(step, folder / "step.pt")
    torch.save(
        {
            "loss_scaler": optim["loss_scaler"],
            "dynamic_loss_scale": optim["dynamic_loss_scale"],
            "overflow": optim["overflow"],
            "ds_version": deepspeed.__version__,
            "param_groups": optim["optimizer_state_dict"]["param_groups"],
        },
        root / "zero" / "optimizer_state.pt",
    )
    shutil.copy(model_states, root / "mp_rank_00_model_states.pt")


if __name__ == "__main__":
    convert(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
