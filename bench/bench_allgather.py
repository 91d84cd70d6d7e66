"""One all-gather of many small tensors' concatenation vs one all-gather per tensor, between CPU ranks over gloo:
the cost runner/train/zero3_gather.py removes from each ZeRO-3 optimizer step. The tensors are the tiny model's
parameters under DeepSpeed's default persistence threshold (1e5 elements), each split in `--ranks` partitions.

    python bench/bench_allgather.py                 # 2 ranks, 50 repetitions, 3 rounds (interleaved)
    python bench/bench_allgather.py --ranks 2 --reps 100 --model conf/model/tiny.yaml

Prints the milliseconds per gather of all of them, each way, and their ratio per round.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def partition_sizes(model_yaml: str, ranks: int, threshold: int = 100_000) -> list[int]:
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = OmegaConf.to_container(OmegaConf.load(model_yaml).arch)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(AutoConfig.for_model(**arch))
    return [-(-p.numel() // ranks) for p in net.parameters() if p.numel() <= threshold]


def rank_main(rank: int, ranks: int, port: int, sizes: list[int], reps: int, rounds: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    parts = [torch.randn(n) for n in sizes]
    wholes = [torch.empty(n * ranks) for n in sizes]
    flat_out = torch.empty(sum(sizes) * ranks)

    def per_tensor():
        handles = [dist.all_gather_into_tensor(w, p, async_op=True) for w, p in zip(wholes, parts)]
        for h in handles:
            h.wait()

    def concatenated():
        dist.all_gather_into_tensor(flat_out, torch.cat(parts))

    for r in range(rounds):
        ms = {}
        for fn in (per_tensor, concatenated):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            ms[fn.__name__] = (time.perf_counter() - start) / reps * 1000
        if rank == 0:
            print(
                f"round {r + 1}: {len(sizes)} tensors, one all-gather each {ms['per_tensor']:.2f} ms, "
                f"one of their concatenation {ms['concatenated']:.2f} ms: "
                f"{ms['per_tensor'] / ms['concatenated']:.1f}x",
                flush=True,
            )
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default=os.path.join(os.path.dirname(__file__), "..", "conf", "model", "tiny.yaml"))
    args = ap.parse_args()
    sizes = partition_sizes(args.model, args.ranks)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(args.ranks, port, sizes, args.reps, args.rounds), nprocs=args.ranks)


if __name__ == "__main__":
    main()
