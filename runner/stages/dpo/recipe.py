"""DPO on the ranks. Each batch holds B pairs as 2B sequences (chosen first) in one forward pass of the policy;
a sequence's log-probability is summed over its answer tokens (the prompt and padding are not scored). The
reference's log-probabilities come from a frozen engine, from the policy with its LoRA adapters switched off, or from
a table computed once before training (and cached with the tokenised data); reference-free losses need none.

1. the policy (and the reference) engines;
2. the loss (runner.rl.preference, by step.loss), with the implicit rewards of chosen and rejected, their margin,
   the preference accuracy, the log-probs and the drift of the policy from the reference;
3. evaluation: the same on the eval pairs, and, when a judge is configured (reward=...), the judge's mean score of
   answers the policy samples for the eval prompts (fixed seed), before training and after it;
4. the shared loop.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from runner import modeling, rewards
from runner.data import batches
from runner.data.prepare import load_prepared
from runner.rl import preference
from runner.stages.dpo.spec import reference_mode
from runner.train import checkpoint, engine as eng, loop, models, onpolicy, rollout
from runner.train.engine import Dist


class Indexed:
    """A tokenised split whose rows carry their index (to look up precomputed reference log-probs)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {**self.rows[i], "index": i}


def run(cfg: DictConfig, run_dir: Path, dist: Dist) -> None:
    step, mode = cfg.step, reference_mode(cfg)
    # 1. data and engines
    eng.seed_everything(int(cfg.seed))
    tokenizer = modeling.load_tokenizer(cfg.model)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    train_set, eval_set = (
        Indexed(load_prepared(p)) for p in (cfg.runtime.data.paths.train, cfg.runtime.data.paths.eval)
    )
    pairs = batches.PairCollator(pad, labels=True)

    def collate(rows: list[dict]) -> dict:
        return {**pairs(rows), "index": torch.tensor([r["index"] for r in rows])}

    ds_config = eng.ds_config(run_dir)
    policy = eng.initialize(
        models.load_causal_lm(
            cfg.model, ds_config, cfg.precision.dtype, cfg.train.gradient_checkpointing, cfg.lora, cfg.lora.r
        ),
        cfg.optimizer,
        ds_config,
    )
    reference, table = None, None
    if mode in ("engine", "precompute"):
        ref_ds = eng.ds_config(run_dir, "reference")
        eng.seed_everything(int(cfg.seed))  # a model built from its architecture starts as the policy did
        source = OmegaConf.create(
            {"path": step.reference_from or cfg.model.path, "arch": cfg.model.get("arch"), "dropout": cfg.model.dropout}
        )
        reference = eng.initialize_frozen(models.load_causal_lm(source, ref_ds, cfg.precision.dtype), ref_ds)
    if mode == "precompute":
        table = reference_table(cfg, run_dir, dist, reference, {"train": train_set, "eval": eval_set}, collate)
        del reference  # freed: training holds the policy alone
        reference = None
        gc.collect()
    judge = rollout.make_judge(cfg, run_dir, tokenizer, pad)
    loss_fn, settings = (
        preference.get(str(step.loss)),
        {"beta": float(step.beta), "label_smoothing": float(step.label_smoothing), "gamma": float(step.gamma)},
    )
    sft_coef = float(step.sft_coef)

    # 2. the loss
    def logps(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return preference.sequence_logps(logits, batch["labels"])

    def reference_logps(batch: dict, split: str) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        if mode == "none":
            return None, None
        if table is not None:
            both = table[split][batch["index"].cpu()].to(batch["input_ids"].device)
            return both[:, 0], both[:, 1]
        with torch.no_grad():
            if mode == "adapters":
                with models.adapters_off(policy.module):
                    ref, _ = logps(policy, batch)
            else:
                ref, _ = logps(reference, batch)
        return ref.chunk(2)

    def pair_stats(batch: dict, split: str) -> dict[str, torch.Tensor]:
        seq, lens = logps(policy, batch)
        (chosen, rejected), (c_len, r_len) = seq.chunk(2), lens.clamp(min=1).chunk(2)
        ref_c, ref_r = reference_logps(batch, split)
        loss, reward_c, reward_r = loss_fn.fn(chosen, rejected, c_len, r_len, ref_c, ref_r, **settings)
        nll = -chosen / c_len  # the chosen answer's NLL per token: step.sft_coef adds it (RPO; TRL's rpo_alpha)
        stats = {
            "loss": loss + sft_coef * nll if sft_coef else loss,
            "nll_chosen": nll.detach(),
            "rewards_chosen": reward_c,
            "rewards_rejected": reward_r,
            "margin": reward_c - reward_r,
            "accuracy": (reward_c > reward_r).float(),
            "logps_chosen": chosen.detach(),
            "logps_rejected": rejected.detach(),
        }
        if ref_c is not None:  # how far the policy moved from the reference, per answer token
            drift = ((chosen - ref_c) / c_len + (rejected - ref_r) / r_len) / 2
            stats["drift"] = drift.detach()
        return stats

    def loss(batch: dict):
        stats = pair_stats(batch, "train")
        return stats.pop("loss").mean(), {k: v.mean() for k, v in stats.items()}

    # 3. evaluation
    prompts = onpolicy.Prompts(eval_set.rows)

    def pair_sums(batch: dict) -> dict[str, float]:
        stats = pair_stats(batch, "eval")
        return {"pairs": len(stats["loss"]), **{k: float(v.sum()) for k, v in stats.items()}}

    def evaluate() -> dict:
        sums = loop.evaluate_batches(
            policy, eval_set, collate, int(cfg.train.micro_batch_size), dist, cfg.train.eval_max_batches, pair_sums
        )
        n = max(sums.pop("pairs"), 1)
        out = {k: v / n for k, v in sums.items()}
        if judge:
            out.update(onpolicy.judged_heldout(policy, prompts, judge, cfg, dist, pad, eos, reference))
        return out

    def export(run_dir: Path) -> dict:
        return checkpoint.export_model(
            policy,
            tokenizer,
            run_dir,
            dist,
            cfg,
            {"kind": "causal_lm", "stage": "dpo", "loss": str(step.loss), "beta": float(step.beta), "reference": mode},
        )

    # 4. the shared loop
    task = loop.Supervised(
        "dpo",
        policy,
        loss,
        evaluate,
        export,
        train_set,
        collate,
        cfg,
        dist,
        objective="accuracy",
        judge=rewards.describe(cfg.reward) if judge else None,
    )
    loop.run(task, cfg, run_dir, dist)


def reference_table(cfg: DictConfig, run_dir: Path, dist: Dist, reference, splits: dict, collate) -> dict:
    """The reference's summed log-probs of every pair's chosen and rejected answer, (n, 2) per split: read from the
    data cache when this reference computed them before, else computed (each rank a share, then gathered) and saved
    beside the tokenised data."""
    cache = Path(cfg.runtime.data.stats.cache) / f"reference-{reference_key(cfg)}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    table = {}
    micro = int(cfg.train.micro_batch_size)
    for split, rows in splits.items():
        mine = batches.eval_batches(len(rows), micro, dist.world, dist.rank)
        longest = max(eng.gather_objects(len(mine), dist.world))
        found = {}
        with torch.no_grad():
            for i in range(longest):  # every rank runs the same number of forwards (ZeRO-3 gathers collectively)
                idx = mine[i] if i < len(mine) else mine[0]
                batch = loop.to_device(collate([rows[j] for j in idx]), dist.device)
                logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                seq, _ = preference.sequence_logps(logits, batch["labels"])
                if i < len(mine):
                    found.update(zip(idx, torch.stack(seq.float().cpu().chunk(2), dim=1).tolist()))
        merged = {k: v for part in eng.gather_objects(found, dist.world) for k, v in part.items()}
        table[split] = torch.tensor([merged[i] for i in range(len(rows))], dtype=torch.float32)
    if dist.main:
        tmp = cache.with_suffix(f".tmp{dist.rank}")
        torch.save(table, tmp)
        tmp.rename(cache)
    return table


def reference_key(cfg: DictConfig) -> str:
    """Which reference computed a table: its path (or architecture and seed), the weights' size and time, the dtype."""
    import hashlib

    path = cfg.step.reference_from or cfg.model.path
    weights = sorted(Path(str(path)).glob("*.safetensors")) + sorted(Path(str(path)).glob("*.bin")) if path else []
    identity = {
        "path": str(path),
        "weights": [(w.name, w.stat().st_size, w.stat().st_mtime) for w in weights],
        "arch": OmegaConf.to_container(cfg.model.arch) if not path else None,
        "seed": int(cfg.seed),
        "dtype": cfg.precision.dtype,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
