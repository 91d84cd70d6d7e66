"""How good is the plan's memory estimate? Predicted vs measured peak memory per rank, for several configurations.

    python bench/calibrate_memory.py                  # every case (~10 min on 2 CPU cores)
    python bench/calibrate_memory.py --only small     # the cases whose name contains "small"
    python bench/calibrate_memory.py --gpu            # on a GPU machine: the same cases with deployment=single_gpu

Each case is a real run (`python -m runner ...`, 2 training steps, random weights built from a config: nothing is
downloaded) on synthetic data whose samples fill data.max_seq_len, so that every batch is as long as the plan
assumes. Predicted: the run's plan.json (`peak_gb`: runtime overhead + every engine's model states + the largest
activations of a step). Measured: the largest `peak_memory_mb` of the run's ranks (its resident set's high-water
mark on CPU, torch.cuda.max_memory_allocated on GPU, to which the plan's CUDA overhead is not added). The target is
a ratio within 0.75-1.25 for every case; the table printed is the one in the README.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "runner" / "assets" / "tiny_tokenizer"
QUICK = ["train.max_steps=2", "train.eval_every=0", "train.eval_max_batches=1", "train.export=false"]
SMALL = {  # ~29 M parameters, a 32k vocabulary: logits matter as they do for real models
    "hidden_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "ffn_dim": 2048,
    "vocab_size": 32000,
    "word_embed_proj_dim": 512,
    "max_position_embeddings": 1024,
}
MEDIUM = {**SMALL, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "ffn_dim": 3072}
MEDIUM["word_embed_proj_dim"] = 768


def arch_overrides(arch: dict | None) -> list[str]:
    if arch is None:
        return []
    return [f"model.arch.{k}={v}" for k, v in arch.items()] + [
        "model.num_params=null",
        "model.largest_layer_params=null",
    ]


def cases() -> list[tuple[str, int, list[str]]]:
    """(name, ranks, overrides)."""
    small, medium = arch_overrides(SMALL), arch_overrides(MEDIUM)
    sft = lambda mb, seq: [f"train.micro_batch_size={mb}", f"data.max_seq_len={seq}"]  # noqa: E731
    return [
        ("tiny sft mb8 s256 z0", 1, sft(8, 256)),
        ("small sft mb4 s256 z0", 1, small + sft(4, 256)),
        ("small sft mb1 s256 z0", 1, small + sft(1, 256)),
        ("small sft mb8 s128 z0", 1, small + sft(8, 128)),
        ("small sft mb4 s512 z0", 1, small + sft(4, 512)),
        ("small sft mb4 s256 z0 ckpt", 1, small + sft(4, 256) + ["train.gradient_checkpointing=true"]),
        ("small sft mb4 s256 z1 2r", 2, small + sft(4, 256) + ["zero=stage1"]),
        ("small sft mb4 s256 z2 2r", 2, small + sft(4, 256) + ["zero=stage2"]),
        ("small sft mb4 s256 z3 2r", 2, small + sft(4, 256) + ["zero=stage3"]),
        ("small reward mb4 s256 z0", 1, small + sft(4, 256) + ["step=reward"]),
        ("medium sft mb2 s256 z0", 1, medium + sft(2, 256)),
        ("small ppo z0", 1, ["step=ppo", "PPO_EXPORTS"]),
        (
            "small ppo z3 2r",
            2,
            ["step=ppo", "PPO_EXPORTS", "zero@step.actor.zero=stage3", "zero@step.critic.zero=stage3"],
        ),
    ]


def synthetic_data(path: Path, rows: int = 64, words: int = 700) -> None:
    """Rows of a 40-word prompt (under PPO's step.max_prompt_len=64 tokens) and answers that are long runs of the
    tiny tokenizer's words (longer than any max_seq_len)."""
    vocab = [
        w
        for line in (REPO / "runner/assets/tiny_data/train.jsonl").read_text().splitlines()[:200]
        for w in json.loads(line)["chosen"].split()
    ]
    rng = random.Random(0)
    with open(path, "w") as fh:
        for _ in range(rows):
            text = lambda n: " " + " ".join(rng.choice(vocab) for _ in range(n))  # noqa: E731
            fh.write(
                json.dumps(
                    {
                        "prompt": "\n\nHuman:" + text(40) + "\n\nAssistant:",
                        "response": text(words),
                        "chosen": text(words),
                        "rejected": text(words),
                    }
                )
                + "\n"
            )


def ppo_exports(root: Path) -> list[str]:
    """An actor (causal LM) and a critic (a scalar head) of the small architecture, random weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, OPTConfig

    config = OPTConfig(**SMALL, dropout=0.0, pad_token_id=1)
    out = []
    for kind, cls in (("actor", AutoModelForCausalLM), ("critic", AutoModelForSequenceClassification)):
        path = root / kind
        if not path.exists():
            torch.manual_seed(0)
            cls.from_config(
                config if kind == "actor" else OPTConfig(**SMALL, num_labels=1, pad_token_id=1)
            ).save_pretrained(path)
            for f in TOKENIZER.iterdir():
                shutil.copy(f, path / f.name)
            (path / "runner_export.json").write_text(
                json.dumps({"kind": "causal_lm" if kind == "actor" else "reward_model"})
            )
        out.append(str(path))
    return [
        f"step.actor_from={out[0]}",
        f"step.critic_from={out[1]}",
        "step.max_prompt_len=64",
        "step.generation.max_new_tokens=192",
        "step.generation_batch_size=4",
        "train.micro_batch_size=4",
        "reward=none",
    ]


def run_case(root: Path, data: Path, ranks: int, overrides: list[str], gpu: bool) -> tuple[float, float]:
    if "PPO_EXPORTS" in overrides:
        overrides = [o for o in overrides if o != "PPO_EXPORTS"] + ppo_exports(root / "exports")
    deploy = ["deployment=single_gpu"] if gpu else ["deployment=cpu", f"deployment.nproc_per_node={ranks}"]
    cmd = [
        sys.executable,
        "-m",
        "runner",
        "data=local",
        f"data.sets.local.path={data}",
        "data.split={sft:1,reward:1,ppo:1}",
        *deploy,
        *QUICK,
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    run_dir = Path(re.search(r"^run directory: (.+)$", proc.stdout, re.MULTILINE).group(1))
    plan = json.loads((run_dir / "plan.json").read_text())
    measured = max(json.loads((run_dir / "summary.json").read_text())["peak_memory_mb"])
    predicted = plan["peak_gb"] - (plan["terms_gb"]["runtime overhead"] if gpu else 0)
    return predicted * 1024, measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--gpu", action="store_true", help="deployment=single_gpu (1-rank cases only)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="calibrate-"))
    data = root / "long.jsonl"
    synthetic_data(data)
    print("| case | ranks | predicted MiB | measured MiB | predicted / measured |\n|---|---|---|---|---|", flush=True)
    worst = 1.0
    for name, ranks, overrides in cases():
        if args.only not in name or (args.gpu and ranks > 1):
            continue
        try:
            predicted, measured = run_case(root, data, ranks, overrides, args.gpu)
        except RuntimeError as err:
            print(f"| {name} | {ranks} | failed | | |\n{err}", flush=True)
            worst = 0.0
            continue
        ratio = predicted / measured
        worst = ratio if abs(ratio - 1) > abs(worst - 1) else worst
        print(f"| {name} | {ranks} | {predicted:,.0f} | {measured:,.0f} | {ratio:.2f} |", flush=True)
    print(f"\nworst ratio: {worst:.2f} (target 0.75-1.25)")
    shutil.rmtree(root, ignore_errors=True)
    return 0 if 0.75 <= worst <= 1.25 else 1


if __name__ == "__main__":
    sys.exit(main())
