"""runner.train.zero3_gather: ZeRO-3's persistent parameters re-gathered with one all-gather on CPU ranks give the
same parameters, bit for bit, as DeepSpeed's one-per-parameter gather, and the same training."""

from __future__ import annotations

import os

import torch

from tests.helpers import adamw, spawn_ranks, tiny_model


def _two_ranks(port: int, queue, rank: int, world: int) -> None:
    """Two ZeRO-3 engines of the tiny model from the same weights and batches: the first trained with DeepSpeed's
    own gather, the second after install(); their losses and persistent parameters, and a partition + gather round
    trip of the second's persistent parameters."""
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import deepspeed

    from runner.train import engine as eng, models, zero3_gather

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    ds = {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100000},  # DeepSpeed's default
        "steps_per_print": 10**9,
    }
    model, opt = tiny_model(), adamw(1e-2)
    calls = []
    flat = zero3_gather.gather_flat
    zero3_gather.gather_flat = lambda *a: (calls.append(len(a[0])), flat(*a))[1]

    def train(engine) -> tuple[list[float], list[torch.Tensor]]:
        losses = []
        for step in range(3):
            ids = torch.randint(3, 1000, (4, 16), generator=torch.Generator().manual_seed(10 * step + rank))
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
        return losses, [p.data.clone() for p in engine.optimizer.persistent_parameters]

    engines = []
    for patched in (False, True):
        installed = zero3_gather.install() if patched else None
        torch.manual_seed(0)
        engines.append(eng.initialize(models.load_causal_lm(model, ds, "fp32"), opt, ds))
        losses, persistent = train(engines[-1])
        if not patched:
            out = {"losses_ds": losses, "persistent_ds": persistent, "calls_ds": len(calls)}
    out.update(installed=installed, losses=losses, calls=list(calls))
    out["same_params"] = all(torch.equal(a, b) for a, b in zip(out.pop("persistent_ds"), persistent))
    params = engines[-1].optimizer.persistent_parameters
    whole = [p.data.clone() for p in params]
    params[0].partition(params)
    out["partitioned"] = all(p.data.numel() == 0 for p in params)
    params[0].all_gather(params)
    out["round_trip"] = all(torch.equal(w, p.data) for w, p in zip(whole, params))
    out["persistent"] = len(params)
    torch.distributed.destroy_process_group()
    queue.put((rank, out))


def test_one_flat_gather_gives_deepspeeds_parameters_and_training():
    for out in spawn_ranks(_two_ranks, 2):
        assert out["installed"] is True
        assert out["calls_ds"] == 0 and out["persistent"] > 20  # the tiny model: all but the token embedding
        assert out["calls"].count(out["persistent"]) >= 3  # each step's re-gather of them all went flat
        assert out["losses"] == out["losses_ds"]  # bitwise: a gather is a copy
        assert out["same_params"]
        assert out["partitioned"] and out["round_trip"]
