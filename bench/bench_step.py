"""The training step alone, old path vs new, interleaved step by step in one process (robust to a shared machine's
load, which moves run-level tokens/s by up to 10x on 2 busy cores): the tiny model on one CPU rank at ZeRO-0,
micro-batch 8 of 64 tokens, forward + backward + optimizer step through DeepSpeed.

    python bench/bench_step.py                      # 4 rounds x 60 steps per variant, medians after 10 warm-up steps
    python bench/bench_step.py --stage reward       # the reward model: the backbone with a scalar head, pairwise loss

Variants: `plain` is what revision ec2b900 ran (torch's for-loop AdamW, DeepSpeed's gradient all-reduce after every
backward, the loss read with float() every micro-step); `runner` is this checkout's engine (runner.train.engine:
fused AdamW, no all-reduce on a lone ZeRO-0 rank; the loss kept as a tensor and read on logging steps, here every
10th). Prints the median step time ratio plain/runner (= tokens/s runner/plain) per round and over all rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stage", choices=("sft", "reward"), default="sft")
    args = ap.parse_args()
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    sys.path.insert(0, str(REPO))
    import deepspeed
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from runner.train import engine as eng

    torch.set_num_threads(args.threads)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    arch = OmegaConf.to_container(OmegaConf.load(REPO / "conf/model/tiny.yaml").arch)
    opt = OmegaConf.create({"name": "AdamW", "impl": "torch", "lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8})
    opt.weight_decay, opt.no_decay = 0.0, ["bias", "layer_norm.weight"]
    ds = {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 8,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 0},
        "steps_per_print": 10**9,
    }

    def model():
        torch.manual_seed(0)
        if args.stage == "reward":
            config = AutoConfig.for_model(**arch, dropout=0.0, num_labels=1, pad_token_id=1)
            return AutoModelForSequenceClassification.from_config(config)
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**arch, dropout=0.0))

    engines = {"runner": eng.initialize(model(), opt, dict(ds))}
    net = model()
    client = torch.optim.AdamW(eng.param_groups(net, opt), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)  # today's default
    engines["plain"] = deepspeed.initialize(model=net, optimizer=client, config=dict(ds))[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, arch["vocab_size"], (8, 64), generator=g)
    kept = []

    def step(name: str, i: int) -> float:
        engine = engines[name]
        start = time.perf_counter()
        if args.stage == "reward":  # rows 0, 2, ... chosen; 1, 3, ... rejected
            scores = engine(input_ids=ids).logits.squeeze(-1)
            loss = -torch.nn.functional.logsigmoid(scores[0::2] - scores[1::2]).mean()
        else:
            loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        if name == "plain":
            float(loss.detach())
        else:
            kept.append(loss.detach())
            if i % 10 == 0:
                sum(float(v) for v in kept)
                kept.clear()
        return time.perf_counter() - start

    times = {"plain": [], "runner": []}
    ratios = []
    for r in range(args.rounds):
        this_round = {"plain": [], "runner": []}
        for i in range(args.steps):
            for name in ("plain", "runner") if i % 2 == 0 else ("runner", "plain"):
                this_round[name].append(step(name, i))
        med = {k: statistics.median(v[10:]) for k, v in this_round.items()}
        ratios.append(med["plain"] / med["runner"])
        for k in times:
            times[k] += this_round[k][10:]
        print(
            f"round {r + 1}: step plain {med['plain'] * 1e3:.1f} ms, runner {med['runner'] * 1e3:.1f} ms, "
            f"tokens/s runner/plain {ratios[-1]:.3f}",
            flush=True,
        )
    overall = statistics.median(times["plain"]) / statistics.median(times["runner"])
    print(f"\nstage={args.stage} steps={args.steps} rounds={args.rounds} threads={args.threads}")
    print(f"| tokens/s runner / plain (median step time, all rounds) | {overall:.3f} |")
    print(
        f"| the same, median of the rounds' ratios (min, max) | {statistics.median(ratios):.3f} "
        f"({min(ratios):.3f}, {max(ratios):.3f}) |"
    )


if __name__ == "__main__":
    main()
