"""A minimal hand-written DeepSpeed SFT loop: the baseline bench/bench_sft.py compares the runner against.

Launched as `deepspeed --num_gpus 1 --no_local_rank bench/hand_sft_loop.py RUN_DIR STEPS LOG_EVERY`; it reuses a
runner run's ds_config.json and tokenised data so that both loops do the same work, and prints one JSON line of
tokens/s per logging interval.
"""

import json
import os
import sys
import time
from pathlib import Path

import deepspeed
import torch
import yaml
from datasets import load_from_disk
from transformers import AutoConfig, AutoModelForCausalLM

run_dir, steps, log_every = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
ds_config = json.loads((run_dir / "ds_config.json").read_text())
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
deepspeed.init_distributed()
torch.manual_seed(cfg["seed"])
model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg["model"]["arch"], dropout=0.0))
optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["optimizer"]["lr"], betas=cfg["optimizer"]["betas"])
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
data = load_from_disk(cfg["runtime"]["data"]["paths"]["train"])
micro, pad = ds_config["train_micro_batch_size_per_gpu"], 1

per_epoch = len(data) // micro
start, tokens = time.perf_counter(), 0
for step in range(1, steps + 1):
    epoch, b = divmod(step - 1, per_epoch)
    if b == 0:  # a new seeded order every epoch, the same samples as the runner's single rank sees
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg["seed"] * 1000 + epoch)).tolist()
    rows = [data[i] for i in perm[b * micro : (b + 1) * micro]]
    longest = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((micro, longest), pad)
    labels = torch.full((micro, longest), -100)
    mask = torch.zeros((micro, longest), dtype=torch.long)
    for i, r in enumerate(rows):
        n, p = len(r["input_ids"]), r["prompt_len"]
        ids[i, :n] = torch.tensor(r["input_ids"])
        mask[i, :n] = 1
        labels[i, p:n] = ids[i, p:n]
    loss = engine(input_ids=ids, attention_mask=mask, labels=labels).loss
    engine.backward(loss)
    engine.step()
    tokens += int(mask.sum())
    if step % log_every == 0:
        elapsed = time.perf_counter() - start
        print(json.dumps({"step": step, "tokens_per_s": tokens / elapsed, "loss": float(loss)}), flush=True)
        start, tokens = time.perf_counter(), 0
