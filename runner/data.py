"""Data: named data sets (conf/data/*.yaml) → normalised prompt/chosen/rejected rows → each stage's slice →
weighted blend → tokenised for the stage → cached.

The driver calls `prepare` once, before launching: it builds the tokenised train/eval sets into a cache keyed by
everything that affects them (files' content, field mapping, template, tokenizer, max length, split, seed, stage)
and records the paths in the run config, so ranks only memory-map Arrow files (`load_prepared`). Batches are padded
to the longest sample in the batch, never to max_seq_len.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from runner.errors import ConfigError
from runner.modeling import tokenizer_fingerprint
from runner.plan import STAGES, is_local_path

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
IGNORE = -100
CACHE_VERSION = 3


# ---------------------------------------------------------------------------------------------------- raw data
def _load_files(path: Path, splits: list[str], key: str):
    from datasets import load_dataset, load_from_disk

    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            return load_from_disk(str(path))
        files: dict[str, str] = {}
        for split in splits:
            for ext in BUILDERS:
                if (path / f"{split}{ext}").is_file():
                    files[split] = str(path / f"{split}{ext}")
                    break
        if not files:
            raise ConfigError(key, f"directory {path} has no {'/'.join(splits)} files ({', '.join(BUILDERS)}) "
                              "and is not a save_to_disk directory", "put train.jsonl (and eval.jsonl) there, or "
                              "point the path at a file")
        builders = {BUILDERS[Path(f).suffix] for f in files.values()}
        if len(builders) > 1:
            raise ConfigError(key, f"directory {path} mixes file formats {sorted(builders)}", "use one format")
        return load_dataset(builders.pop(), data_files=files)
    if path.suffix not in BUILDERS:
        raise ConfigError(key, f"unsupported file type {path.suffix!r} for {path}",
                          f"use one of {', '.join(BUILDERS)}, or a save_to_disk directory")
    return load_dataset(BUILDERS[path.suffix], data_files={"train": str(path)})


def load_raw(name: str, ds: DictConfig, seed: int):
    """The train and eval splits of one data set, as `datasets.Dataset`s (eval made from train if it has none)."""
    import datasets
    from datasets import Dataset, DatasetDict, load_dataset

    datasets.utils.logging.set_verbosity(50)  # CRITICAL: errors are reported once, by the runner
    datasets.disable_progress_bars()
    key = f"data.sets.{name}.path"
    path = str(ds.path)
    wanted = [s for s in (ds.splits.train, ds.splits.eval) if s]
    try:
        if is_local_path(path):
            raw = _load_files(Path(os.path.expanduser(path)), wanted, key)
        else:
            raw = load_dataset(path, ds.get("config_name"))
    except ConfigError:
        raise
    except Exception as exc:  # unreadable file, malformed JSON, hub not reachable, ...
        while type(exc).__name__ == "DatasetGenerationError" and exc.__cause__ is not None:
            exc = exc.__cause__  # datasets wraps the real reason (e.g. "JSON parse error: ... in row 0")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(key, f"cannot load {path!r}: {first}",
                          "check the file (or, for a hub id, that the hub is reachable or a local copy is given)"
                          ) from None
    if isinstance(raw, Dataset):
        raw = DatasetDict({"train": raw})
    if ds.splits.train not in raw:
        raise ConfigError(f"data.sets.{name}.splits.train", f"{path} has no split {ds.splits.train!r} "
                          f"(it has {list(raw)})", f"set data.sets.{name}.splits.train to one of {list(raw)}")
    def numbered(split, split_name):  # remember each row's place in its file, for error messages
        return split.add_column("__row__", [f"{split_name} split, row {i}" for i in range(len(split))])

    train = numbered(raw[ds.splits.train], ds.splits.train)
    if ds.splits.eval and ds.splits.eval in raw:
        evaluation = numbered(raw[ds.splits.eval], ds.splits.eval)
    elif ds.splits.eval and is_local_path(path) and Path(path).is_dir():
        raise ConfigError(f"data.sets.{name}.splits.eval", f"{path} has no {ds.splits.eval!r} split",
                          f"add {ds.splits.eval}.jsonl there, or set data.sets.{name}.splits.eval=null for a seeded "
                          "split of train")
    else:
        parts = train.train_test_split(test_size=float(ds.eval_fraction), seed=seed)
        train, evaluation = parts["train"], parts["test"]
    return train, evaluation


def content_fingerprint(name: str, ds: DictConfig, train, evaluation) -> str:
    """What the raw data is: the files' content for local data, datasets' fingerprint (revision) for the hub."""
    path = Path(os.path.expanduser(str(ds.path)))
    if not is_local_path(str(ds.path)):
        return f"{train._fingerprint}:{evaluation._fingerprint}"
    digest = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            digest.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------- rows
class BadRow(ValueError):
    pass


def _field(row: dict, dotted: str):
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise BadRow(f"has no field {dotted!r}")
        value = value[part]
    return value


def _text(row: dict, dotted: str) -> str:
    value = _field(row, dotted)
    if value is None:
        raise BadRow(f"field {dotted!r} is missing or null")
    if not isinstance(value, str):
        raise BadRow(f"field {dotted!r} is {type(value).__name__}, not text")
    if not value.strip():
        raise BadRow(f"field {dotted!r} is empty")
    return value


def normalize(row: dict, ds: DictConfig, stage: str) -> dict[str, str]:
    """One raw row → {prompt, chosen, rejected, target} in the model's text format, or BadRow."""
    f = ds.fields
    prefix = ds.get("answer_prefix") or ""
    if ds.format == "embedded":
        chosen_full, rejected_full = _text(row, f.chosen), _text(row, f.rejected)
        cut = chosen_full.rfind(ds.delimiter)
        if cut < 0:
            raise BadRow(f"chosen text has no delimiter {ds.delimiter!r}")
        prompt = chosen_full[: cut + len(ds.delimiter)]
        if not rejected_full.startswith(prompt):
            raise BadRow("chosen and rejected do not share the prompt before the last delimiter")
        chosen, rejected = chosen_full[len(prompt):], rejected_full[len(prompt):]
    else:
        prompt = _text(row, f.prompt)
        if ds.format == "scored":
            a, b = _text(row, f.answer_a), _text(row, f.answer_b)
            if f.get("label"):
                a_wins = bool(_field(row, f.label))
            else:
                sa, sb = _field(row, f.score_a), _field(row, f.score_b)
                if not isinstance(sa, (int, float)) or not isinstance(sb, (int, float)):
                    raise BadRow("scores are not numbers")
                if sa == sb:
                    raise BadRow("tie: both answers have the same score")
                a_wins = sa > sb
            chosen, rejected = (a, b) if a_wins else (b, a)
        elif ds.format == "pairs":  # read only the columns this stage uses (SFT-only sets may have no pairs)
            sft_reads = ds.sft_target if stage == "sft" else None
            chosen = _text(row, f.chosen) if stage == "reward" or sft_reads == "chosen" else ""
            rejected = _text(row, f.rejected) if stage == "reward" or sft_reads == "rejected" else ""
        else:
            raise BadRow(f"unknown format {ds.format!r} (use pairs, scored or embedded)")
        prompt = ds.template.format(prompt=prompt)
        chosen, rejected = (prefix + chosen if chosen else chosen), (prefix + rejected if rejected else rejected)
    if stage == "sft":
        target = {"chosen": chosen, "rejected": rejected}.get(ds.sft_target)
        if target is None:
            target = prefix + _text(row, f[ds.sft_target] if ds.sft_target in f else ds.sft_target)
    else:
        target = ""
    if stage == "reward" and chosen == rejected:
        raise BadRow("chosen and rejected are identical")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "target": target}


def _normalize_split(split, name: str, ds: DictConfig, stage: str, policy: str, where: str):
    def fn(batch: dict) -> dict:
        out: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "target": [], "bad": []}
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        for row in rows:
            place = row.pop("__row__")
            try:
                norm, bad = normalize(row, ds, stage), ""
            except BadRow as exc:
                if policy == "error":
                    raise ConfigError(f"data.sets.{name}", f"{where}, {place}: {exc}",
                                      "fix the row, or set data.bad_rows=skip to drop such rows (they are counted)"
                                      ) from None
                norm, bad = {"prompt": "", "chosen": "", "rejected": "", "target": ""}, str(exc)
            for k, v in norm.items():
                out[k].append(v)
            out["bad"].append(bad)
        return out

    normalized = split.map(fn, batched=True, remove_columns=split.column_names,
                           load_from_cache_file=False)
    bad = [b for b in normalized["bad"] if b]
    normalized = normalized.filter(lambda r: not r["bad"], load_from_cache_file=False).remove_columns("bad")
    reasons: dict[str, int] = {}
    for b in bad:
        reasons[b] = reasons.get(b, 0) + 1
    return normalized, {"bad_rows_skipped": len(bad), "bad_row_reasons": reasons}


# ---------------------------------------------------------------------------------------------------- slicing
def stage_slice(n: int, split: list[float], stage_index: int, seed: int) -> np.ndarray:
    """Rows of a set of n rows that belong to a stage: a seeded permutation (depends only on n and the seed) cut
    into consecutive chunks by the normalised shares of `split`. Disjoint across stages, identical everywhere."""
    shares = np.asarray(split, dtype=float)
    bounds = np.round(np.concatenate([[0.0], np.cumsum(shares)]) / shares.sum() * n).astype(int)
    perm = np.random.RandomState(seed).permutation(n)
    return perm[bounds[stage_index]: bounds[stage_index + 1]]


def weighted(indices: np.ndarray, weight: float, seed: int) -> np.ndarray:
    """round(weight x len) rows: a seeded subsample for weight < 1, whole repeats plus a subsample for weight > 1."""
    want = int(round(weight * len(indices)))
    whole, rest = divmod(want, len(indices)) if len(indices) else (0, 0)
    picked = np.random.RandomState(seed + 7).permutation(len(indices))[:rest]
    return np.concatenate([np.tile(indices, whole), indices[np.sort(picked)]]).astype(int)


# ---------------------------------------------------------------------------------------------------- tokenising
def _fit(ids: list[int], max_len: int, policy: str) -> tuple[list[int] | None, bool]:
    if len(ids) <= max_len:
        return ids, False
    return (ids[:max_len] if policy == "truncate" else None), True


def _tokenize(batch: dict, tok, stage: str, max_len: int, policy: str) -> dict:
    prompts = tok(batch["prompt"], add_special_tokens=True)["input_ids"]
    eos = [tok.eos_token_id]
    out: dict[str, list] = {"overlong": [], "keep": []}
    if stage == "sft":
        answers = tok(batch["target"], add_special_tokens=False)["input_ids"]
        out.update(input_ids=[], prompt_len=[])
        for p, a in zip(prompts, answers):
            ids, over = _fit(p + a + eos, max_len, policy)
            keep = ids is not None and len(p) < len(ids)  # at least one response token left to learn
            out["input_ids"].append(ids or [])
            out["prompt_len"].append(min(len(p), len(ids or [])))
            out["overlong"].append(over)
            out["keep"].append(keep)
    elif stage == "reward":
        chosen = tok(batch["chosen"], add_special_tokens=False)["input_ids"]
        rejected = tok(batch["rejected"], add_special_tokens=False)["input_ids"]
        out.update(chosen_ids=[], rejected_ids=[])
        for p, c, r in zip(prompts, chosen, rejected):
            c_ids, c_over = _fit(p + c + eos, max_len, policy)
            r_ids, r_over = _fit(p + r + eos, max_len, policy)
            keep = c_ids is not None and r_ids is not None and c_ids != r_ids  # a pair that still differs
            out["chosen_ids"].append(c_ids or [])
            out["rejected_ids"].append(r_ids or [])
            out["overlong"].append(c_over or r_over)
            out["keep"].append(keep)
    else:  # ppo: prompts only; over-long prompts are never cut (the answer would continue mid-prompt)
        out.update(prompt_ids=[])
        for p in prompts:
            over = len(p) > max_len
            out["prompt_ids"].append(p)
            out["overlong"].append(over)
            out["keep"].append(not over)
    return out


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


def _build(cfg: DictConfig, tokenizer, stage: str, raw: dict, out_dir: Path) -> dict:
    from datasets import concatenate_datasets

    data = cfg.data
    seed, max_len, stage_index = int(cfg.seed), int(data.max_seq_len), STAGES[stage]
    if stage == "ppo":
        max_len = int(cfg.step.max_prompt_len)
    stats: dict[str, Any] = {}
    parts: dict[str, list] = {"train": [], "eval": []}
    for name, (ds, train, evaluation) in raw.items():
        stats[name] = {}
        for split_name, split in (("train", train), ("eval", evaluation)):
            where = str(ds.path)
            # The stage's slice is cut on the raw rows, before any row is dropped, so that the slices of all stages
            # stay disjoint whatever each stage's own checks drop.
            idx = np.arange(len(split)) if ds.sft_only else stage_slice(len(split), list(data.split), stage_index,
                                                                           seed)
            slice_rows = len(idx)
            normalized, bad = _normalize_split(split.select(idx), name, ds, stage, data.bad_rows, where)
            chosen = np.arange(len(normalized))
            if split_name == "train":
                chosen = weighted(chosen, float(ds.weight), seed)
            tokenized = normalized.select(chosen).map(
                _tokenize, batched=True, remove_columns=normalized.column_names, load_from_cache_file=False,
                fn_kwargs={"tok": tokenizer, "stage": stage, "max_len": max_len, "policy": data.overlong})
            overlong = sum(tokenized["overlong"])
            if stage == "ppo" and overlong and data.overlong == "truncate":
                longest = max(len(ids) for ids in tokenized["prompt_ids"])
                raise ConfigError("step.max_prompt_len", f"{overlong} prompts of data set {name!r} ({where}, "
                                  f"{split_name} split) are longer than step.max_prompt_len={max_len} tokens "
                                  f"(the longest has {longest}); a prompt cannot be cut without losing its question",
                                  "raise step.max_prompt_len (at most the actor's positions minus "
                                  "step.generation.max_new_tokens), or set data.overlong=drop to skip such prompts "
                                  "(they are counted)")
            tokenized = tokenized.filter(lambda r: r["keep"], load_from_cache_file=False)
            tokenized = tokenized.remove_columns(["overlong", "keep"])
            stats[name][split_name] = {"rows": len(split), **bad, "slice_rows": slice_rows,
                                       "weighted_rows": len(chosen), "overlong": overlong,
                                       "overlong_policy": data.overlong, "kept": len(tokenized)}
            parts[split_name].append(tokenized)
    counts = {}
    for split_name, pieces in parts.items():
        merged = concatenate_datasets(pieces) if len(pieces) > 1 else pieces[0]
        counts[split_name] = len(merged)
        if len(merged) == 0:
            raise ConfigError("data.split", f"the {stage} stage gets no {split_name} samples from "
                              f"{', '.join(raw)} (split {list(data.split)}, max_seq_len {max_len})",
                              f"give {stage} a share in data.split, use more data, or raise data.max_seq_len")
        merged.save_to_disk(str(out_dir / split_name))
    return {"counts": counts, "sets": stats}


def prepare(cfg: DictConfig, tokenizer, cache_root: Path) -> Prepared:
    """Tokenise the train and eval samples of the run's stage into the cache (once); return paths and counts."""
    stage = cfg.step.name
    raw = {}
    for name, ds in cfg.data.sets.items():
        if ds.sft_only and stage != "sft":
            continue
        train, evaluation = load_raw(name, ds, int(cfg.seed))
        raw[name] = (ds, train, evaluation)
    if not raw:
        raise ConfigError("data", f"no data set is used by the {stage} stage (all are sft_only)",
                          "add a data set that is not sft_only")
    key_parts = {"version": CACHE_VERSION, "stage": stage, "seed": int(cfg.seed),
                 "data": OmegaConf.to_container(cfg.data, resolve=True),
                 "content": {n: content_fingerprint(n, ds, t, e) for n, (ds, t, e) in raw.items()},
                 "tokenizer": tokenizer_fingerprint(tokenizer), "eos": tokenizer.eos_token_id}
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:20]
    root = cache_root / f"{stage}-{key}"
    if not (root / "meta.json").exists():
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            built = _build(cfg, tokenizer, stage, raw, tmp)
            (tmp / "meta.json").write_text(json.dumps({"key": key_parts, **built}, indent=2, default=str))
            tmp.rename(root)
        except OSError:
            if not (root / "meta.json").exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first, or the build failed
    meta = json.loads((root / "meta.json").read_text())
    paths = {name: str(root / name) for name in ("train", "eval")}
    return Prepared(paths=paths, counts=meta["counts"], stats={"cache": str(root), "sets": meta["sets"]})


def prepare_unsupervised(cfg: DictConfig, tokenizer, cache_root: Path) -> dict:
    """PPO's pretraining-loss data (step.unsupervised): the texts of one split, tokenised with an eos after each,
    concatenated and cut into blocks of block_size tokens (as DeepSpeed-Chat groups them). Cached like `prepare`."""
    from datasets import Dataset

    uns = cfg.step.unsupervised
    block = int(uns.block_size or int(cfg.step.max_prompt_len) + int(cfg.step.generation.max_new_tokens))
    spec = OmegaConf.create({"path": uns.path, "config_name": uns.config_name,
                             "splits": {"train": uns.split, "eval": None}, "eval_fraction": 0.0})
    import datasets

    datasets.utils.logging.set_verbosity(50)
    datasets.disable_progress_bars()
    try:
        if is_local_path(str(uns.path)):
            local = Path(os.path.expanduser(str(uns.path)))
            if not local.exists():
                raise ConfigError("step.unsupervised.path", f"{uns.path!r} does not exist",
                                  "give a text data set: a hub id, a json/jsonl/csv/parquet file or a directory")
            raw = _load_files(local, [uns.split], "step.unsupervised.path")
        else:
            from datasets import load_dataset

            raw = load_dataset(str(uns.path), uns.config_name)
    except ConfigError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError("step.unsupervised.path", f"cannot load {uns.path!r}: {first}",
                          "check the path (or that the hub is reachable)") from None
    split = raw[uns.split] if uns.split in raw else None
    if split is None:
        raise ConfigError("step.unsupervised.split", f"{uns.path} has no split {uns.split!r} (it has {list(raw)})",
                          f"set step.unsupervised.split to one of {list(raw)}")
    if uns.field not in split.column_names:
        raise ConfigError("step.unsupervised.field", f"{uns.path} has no column {uns.field!r} "
                          f"(it has {split.column_names})", "set step.unsupervised.field to its text column")
    key_parts = {"version": CACHE_VERSION, "kind": "unsupervised", "block": block,
                 "spec": OmegaConf.to_container(uns, resolve=True),
                 "content": content_fingerprint("unsupervised", spec, split, split),
                 "tokenizer": tokenizer_fingerprint(tokenizer)}
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:20]
    root = cache_root / f"unsupervised-{key}"
    if not (root / "meta.json").exists():
        texts = [t for t in split[uns.field] if isinstance(t, str) and t.strip()]
        ids: list[int] = []
        for start in range(0, len(texts), 1000):
            for piece in tokenizer(texts[start:start + 1000], add_special_tokens=False)["input_ids"]:
                ids.extend(piece + [tokenizer.eos_token_id])
        blocks = [ids[i:i + block] for i in range(0, len(ids) - block + 1, block)]
        if not blocks:
            raise ConfigError("step.unsupervised.path", f"{uns.path} has {len(ids)} tokens of text, fewer than one "
                              f"block of {block}", "use more text or a smaller step.unsupervised.block_size")
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        Dataset.from_dict({"input_ids": blocks}).save_to_disk(str(tmp / "train"))
        (tmp / "meta.json").write_text(json.dumps({"key": key_parts, "blocks": len(blocks)}, default=str))
        try:
            tmp.rename(root)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((root / "meta.json").read_text())
    return {"path": str(root / "train"), "blocks": meta["blocks"], "block_size": block}


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


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


class CausalLMCollator:
    """Pads a batch to its longest sample; labels mask padding and (unless train_on_prompt) the prompt."""

    def __init__(self, pad_id: int, train_on_prompt: bool = False):
        self.pad_id, self.train_on_prompt = pad_id, train_on_prompt

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = _pad([r["input_ids"] for r in rows], self.pad_id)
        labels = torch.full_like(ids, IGNORE)
        for i, r in enumerate(rows):
            start = 0 if self.train_on_prompt else r["prompt_len"]
            labels[i, start:len(r["input_ids"])] = ids[i, start:len(r["input_ids"])]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class PairCollator:
    """A batch of B pairs → 2B sequences (the B chosen first, then the B rejected), padded to the longest."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = _pad([r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows], self.pad_id)
        return {"input_ids": ids, "attention_mask": mask}
