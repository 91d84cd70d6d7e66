"""Data: load a data set (hub id, local files or a save_to_disk directory), split, tokenise per stage, cache, batch.

The driver calls `prepare` once, before launching: it tokenises into a cache keyed by everything that affects the
result and records the cache paths in the run config, so ranks only memory-map Arrow files (`load_prepared`).
Batches are padded to the longest sample in the batch, never to max_seq_len.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from runner.errors import ConfigError
from runner.plan import is_local_path

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
IGNORE = -100


# ---------------------------------------------------------------------------------------------------- raw data
def _load_files(path: Path, splits: list[str]):
    from datasets import load_dataset, load_from_disk

    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            return load_from_disk(str(path))
        files: dict[str, str] = {}
        for split in splits:
            for ext, builder in BUILDERS.items():
                if (path / f"{split}{ext}").is_file():
                    files[split] = str(path / f"{split}{ext}")
                    break
        if not files:
            raise ConfigError("data.path", f"directory {path} has no {'/'.join(splits)} files "
                              f"({', '.join(BUILDERS)}) and is not a save_to_disk directory",
                              "put train.jsonl (and eval.jsonl) there, or point data.path at a file")
        builders = {BUILDERS[Path(f).suffix] for f in files.values()}
        if len(builders) > 1:
            raise ConfigError("data.path", f"directory {path} mixes file formats {sorted(builders)}",
                              "use one format for all splits")
        return load_dataset(builders.pop(), data_files=files)
    if path.suffix not in BUILDERS:
        raise ConfigError("data.path", f"unsupported file type {path.suffix!r} for {path}",
                          f"use one of {', '.join(BUILDERS)}, or a save_to_disk directory")
    return load_dataset(BUILDERS[path.suffix], data_files={"train": str(path)})


def load_raw(data: DictConfig, seed: int):
    """The train and eval splits of a data set, as `datasets.Dataset`s."""
    import datasets
    from datasets import Dataset, DatasetDict, load_dataset

    datasets.utils.logging.set_verbosity(50)  # CRITICAL: errors are reported once, by the runner
    datasets.disable_progress_bars()
    path = str(data.path)
    wanted = [s for s in (data.splits.train, data.splits.eval) if s]
    try:
        if is_local_path(path):
            raw = _load_files(Path(os.path.expanduser(path)), wanted)
        else:
            raw = load_dataset(path)
    except ConfigError:
        raise
    except Exception as exc:  # unreadable file, malformed JSON, hub not reachable, ...
        while type(exc).__name__ == "DatasetGenerationError" and exc.__cause__ is not None:
            exc = exc.__cause__  # datasets wraps the real reason (e.g. "JSON parse error: ... in row 0")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError("data.path", f"cannot load {path!r}: {first}",
                          "check the file (or, for a hub id, that the hub is reachable or a local copy is given)"
                          ) from None
    if isinstance(raw, Dataset):
        raw = DatasetDict({"train": raw})
    if data.splits.train not in raw:
        raise ConfigError("data.splits.train", f"{path} has no split {data.splits.train!r} (it has {list(raw)})",
                          f"set data.splits.train to one of {list(raw)}")
    train = raw[data.splits.train]
    if data.splits.eval and data.splits.eval in raw:
        evaluation = raw[data.splits.eval]
    else:
        parts = train.train_test_split(test_size=float(data.eval_fraction), seed=seed)
        train, evaluation = parts["train"], parts["test"]
    for name, split in (("train", train), ("eval", evaluation)):
        if len(split) == 0:
            raise ConfigError(f"data.splits.{name}", f"the {name} split of {path} is empty")
    return train, evaluation


def _check_columns(split, columns: dict[str, str], path: str) -> None:
    for role, column in columns.items():
        if column not in split.column_names:
            raise ConfigError(f"data.fields.{role}", f"{path} has no column {column!r} "
                              f"(columns: {', '.join(split.column_names)})",
                              f"set data.fields.{role} to the column that holds the {role}")


# ---------------------------------------------------------------------------------------------------- tokenising
def _tokenize_sft(batch: dict, tok, prompt_col: str, target_col: str, max_len: int) -> dict:
    prompts = tok(batch[prompt_col], add_special_tokens=True)["input_ids"]
    answers = tok(batch[target_col], add_special_tokens=False)["input_ids"]
    out: dict[str, list] = {"input_ids": [], "prompt_len": [], "truncated": []}
    for p, a in zip(prompts, answers):
        ids = p + a + [tok.eos_token_id]
        out["truncated"].append(len(ids) > max_len)
        ids = ids[:max_len]
        out["input_ids"].append(ids)
        out["prompt_len"].append(min(len(p), len(ids)))
    return out


TOKENIZERS = {"sft": (_tokenize_sft, ("prompt", "target"))}


@dataclasses.dataclass
class Prepared:
    paths: dict[str, str]
    counts: dict[str, int]
    stats: dict[str, Any]

    def steps_per_epoch(self, train: DictConfig, world: int) -> int:
        per_step = int(train.micro_batch_size) * world
        return (self.counts["train"] // per_step) // int(train.gradient_accumulation_steps)

    def as_dict(self) -> dict:
        return {"paths": self.paths, "counts": self.counts, "stats": self.stats}


def _fingerprint(tok) -> str:
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def prepare(cfg: DictConfig, tokenizer, cache_root: Path) -> Prepared:
    """Tokenise the train and eval splits for cfg.step.name into the cache (once); return their paths and counts."""
    data, stage = cfg.data, cfg.step.name
    train, evaluation = load_raw(data, int(cfg.seed))
    fn, roles = TOKENIZERS[stage]
    columns = {"prompt": data.fields.prompt, "target": data.sft_target} if stage == "sft" else {}
    _check_columns(train, columns, str(data.path))
    key_parts = {"stage": stage, "data": OmegaConf.to_container(data, resolve=True), "seed": int(cfg.seed),
                 "tokenizer": _fingerprint(tokenizer), "eos": tokenizer.eos_token_id,
                 "raw": [train._fingerprint, evaluation._fingerprint], "version": 1}
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:20]
    root = cache_root / f"{stage}-{key}"
    meta_path = root / "meta.json"
    if not meta_path.exists():
        stats: dict[str, Any] = {}
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        for name, split in (("train", train), ("eval", evaluation)):
            tokenized = split.map(fn, batched=True, remove_columns=split.column_names,
                                  fn_kwargs={"tok": tokenizer, "prompt_col": columns["prompt"],
                                             "target_col": columns["target"], "max_len": int(data.max_seq_len)},
                                  desc=f"tokenising {name}", load_from_cache_file=False)
            before = len(tokenized)
            truncated = sum(tokenized["truncated"])
            tokenized = tokenized.filter(lambda r: r["prompt_len"] < len(r["input_ids"]), load_from_cache_file=False)
            lengths = [len(x) for x in tokenized["input_ids"]]
            stats[name] = {"rows": before, "kept": len(tokenized), "truncated": truncated,
                           "dropped_no_response": before - len(tokenized),
                           "mean_tokens": sum(lengths) / max(1, len(lengths)), "max_tokens": max(lengths or [0])}
            if len(tokenized) == 0:
                raise ConfigError("data.max_seq_len", f"no {name} sample keeps a response token within "
                                  f"{data.max_seq_len} tokens", "raise data.max_seq_len")
            tokenized.save_to_disk(str(tmp / name))
        (tmp / "meta.json").write_text(json.dumps({"key": key_parts, "stats": stats}, indent=2, default=str))
        try:
            tmp.rename(root)
        except OSError:  # another process finished first: use its copy
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads(meta_path.read_text())
    paths = {name: str(root / name) for name in ("train", "eval")}
    counts = {name: meta["stats"][name]["kept"] for name in ("train", "eval")}
    return Prepared(paths=paths, counts=counts, stats=meta["stats"])


def load_prepared(path: str):
    from datasets import load_from_disk

    return load_from_disk(path)


# ---------------------------------------------------------------------------------------------------- batching
def train_batches(n: int, micro: int, world: int, rank: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's micro-batches for one epoch. Global micro-step b takes samples perm[b·micro·world : (b+1)·micro·world]
    and rank r takes its r-th slice, so the samples of a step do not depend on how they are spread over ranks."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    per_step = micro * world
    return [perm[b * per_step + rank * micro: b * per_step + (rank + 1) * micro] for b in range(n // per_step)]


def eval_batches(n: int, micro: int, world: int, rank: int) -> list[list[int]]:
    mine = list(range(rank, n, world))
    return [mine[i: i + micro] for i in range(0, len(mine), micro)]


class CausalLMCollator:
    """Pads a batch to its longest sample; labels mask padding and (unless train_on_prompt) the prompt."""

    def __init__(self, pad_id: int, train_on_prompt: bool = False):
        self.pad_id, self.train_on_prompt = pad_id, train_on_prompt

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = 1
            start = 0 if self.train_on_prompt else r["prompt_len"]
            labels[i, start:n] = ids[i, start:n]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
