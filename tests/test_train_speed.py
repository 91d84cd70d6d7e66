"""The training-step shortcuts keep the maths: one rank at ZeRO-0 skips DeepSpeed's gradient all-reduce with itself
(the parameters after training are bitwise those of the engine that all-reduces), and torch's fused AdamW
(optimizer.fused=true) trains a real model to the for-loop AdamW's parameters within float32 rounding."""

from __future__ import annotations

import os
import socket

import torch
from omegaconf import OmegaConf

STEPS = 4


def _train(port: int, queue) -> None:
    """One rank (a fresh process group): the tiny OPT model trained STEPS steps by runner.train.engine.initialize
    three ways; their parameters afterwards."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from transformers import OPTConfig, OPTForCausalLM

    from runner.train import engine as eng

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0}}
    arch = dict(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4)
    data = torch.randint(3, 64, (STEPS, 4, 12), generator=torch.Generator().manual_seed(1))
    out = {}
    for name, fused, allreduce in (("loop", False, True), ("loop_skip", False, False), ("fused", True, False)):
        torch.manual_seed(0)
        model = OPTForCausalLM(OPTConfig(**arch, max_position_embeddings=32, dropout=0.0))
        opt = OmegaConf.create(
            {
                "name": "AdamW",
                "impl": "torch",
                "lr": 1e-2,
                "betas": [0.9, 0.95],
                "eps": 1e-8,
                "weight_decay": 0.1,
                "no_decay": ["bias"],
                "fused": fused,
            }
        )
        engine = eng.initialize(model, opt, dict(ds))
        out[name + "_skipped"] = not engine.enable_backward_allreduce
        engine.enable_backward_allreduce = allreduce  # "loop": DeepSpeed's own path, all-reducing with itself
        for ids in data:
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
        out[name] = torch.cat([p.detach().flatten() for p in engine.module.parameters()]).tolist()
        out[name + "_first"] = float(loss)
    torch.distributed.destroy_process_group()
    queue.put(out)


def test_lone_rank_skips_allreduce_and_fused_adamw_matches_the_loop():
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_train, args=(port, queue))
    proc.start()
    out = queue.get(timeout=300)
    proc.join(timeout=60)
    assert proc.exitcode == 0
    assert out["loop_skipped"] and out["fused_skipped"]  # one rank, ZeRO-0: the runner turns the all-reduce off
    loop, skip, fused = (torch.tensor(out[k], dtype=torch.float32) for k in ("loop", "loop_skip", "fused"))
    assert torch.equal(loop, skip)  # the all-reduce with oneself is the identity: bitwise the same parameters
    # fused AdamW: the same update, rounded differently (~1 float32 ulp per operation). Adam's step is
    # lr * m / (sqrt(v) + eps) (each element moves up to lr = 1e-2 per step); where a gradient is as small as eps
    # (embedding rows of tokens a batch barely touches), a rounding of v changes that element's step by ~1e-3 of lr.
    # So: every parameter within 1% of one step's size, the typical one within ~1e-8, and not bitwise (fused ran)
    diff = (loop - fused).abs()
    assert 0 < float(diff.max()) < 1e-4 and float(diff.mean()) < 1e-7, (float(diff.max()), float(diff.mean()))
    assert abs(out["loop_first"] - out["fused_first"]) < 1e-5
