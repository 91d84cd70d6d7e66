"""The driver's data step: named data sets -> normalised rows -> the method's slice of each set (data.split) ->
weighted blend -> tokenised for the method's kind of rows -> cached.

`prepare` runs once, before launch: it builds the tokenised train/eval sets into a cache keyed by everything that
affects them (files' content, field mapping, template, tokenizer, max length, split, seed, kind) and returns the
paths, so ranks only memory-map Arrow files (`load_prepared`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from runner.data import kinds, packing, rows, sources
from runner.errors import ConfigError

CACHE_VERSION = 6
DS_CHAT_SPLIT = ("sft", "reward", "ppo")  # the order of DeepSpeed-Chat's data_split list (2,4,4)


@dataclasses.dataclass
class Prepared:
    paths: dict[str, str]
    counts: dict[str, int]
    stats: dict[str, Any]

    def as_dict(self) -> dict:
        return {"paths": self.paths, "counts": self.counts, "stats": self.stats}


def split_shares(split) -> dict[str, float]:
    """data.split as {share name: weight}: a mapping as given, or DeepSpeed-Chat's list (sft, reward, ppo)."""
    if isinstance(split, (list, tuple)) or OmegaConf.is_list(split):
        return dict(zip(DS_CHAT_SPLIT, list(split)))
    return dict(split)


def stage_slice(n: int, split: dict[str, float], share: str, seed: int) -> np.ndarray:
    """Rows of a set of n rows that belong to one share of data.split: a seeded permutation (depends only on n and
    the seed) cut into consecutive chunks by the normalised shares, in the order given. Disjoint across shares,
    identical on every rank and node."""
    names = list(split)
    shares = np.asarray([split[k] for k in names], dtype=float)
    bounds = np.round(np.concatenate([[0.0], np.cumsum(shares)]) / shares.sum() * n).astype(int)
    perm = np.random.RandomState(seed).permutation(n)
    i = names.index(share)
    return perm[bounds[i] : bounds[i + 1]]


def weighted(indices: np.ndarray, weight: float, seed: int) -> np.ndarray:
    """round(weight x len) rows: a seeded subsample for weight < 1, whole repeats plus a subsample for weight > 1."""
    want = int(round(weight * len(indices)))
    whole, rest = divmod(want, len(indices)) if len(indices) else (0, 0)
    picked = np.random.RandomState(seed + 7).permutation(len(indices))[:rest]
    return np.concatenate([np.tile(indices, whole), indices[np.sort(picked)]]).astype(int)


def chat(ds: DictConfig, name: str, tokenizer) -> bool:
    """Whether a set's prompts go in the tokenizer's chat template: data.sets.<name>.chat_template (true | auto:
    when the tokenizer has one | false)."""
    want = ds.get("chat_template", False)
    has = bool(getattr(tokenizer, "chat_template", None))
    if want not in (True, False, "auto"):
        raise ConfigError(f"data.sets.{name}.chat_template", f"must be true, false or auto, got {want!r}")
    if want is True and not has:
        raise ConfigError(
            f"data.sets.{name}.chat_template",
            "is true, but the tokenizer has no chat template",
            f"set data.sets.{name}.chat_template=auto (or false), or use a tokenizer with one",
        )
    return has if want == "auto" else bool(want)


def _build(cfg: DictConfig, method, share: str, tokenizer, raw: dict, out_dir: Path) -> dict:
    from datasets import concatenate_datasets

    data, seed, kind = cfg.data, int(cfg.seed), method.data
    max_len = method.max_len(cfg)
    split = split_shares(data.split)
    stats: dict[str, Any] = {}
    parts: dict[str, list] = {"train": [], "eval": []}
    for name, (ds, train, evaluation) in raw.items():
        stats[name] = {}
        for split_name, part in (("train", train), ("eval", evaluation)):
            where = str(ds.path)
            # The slice is cut on the raw rows, before any row is dropped, so that the slices of all methods stay
            # disjoint whatever each method's own checks drop.
            idx = np.arange(len(part)) if ds.sft_only else stage_slice(len(part), split, share, seed)
            normalized, bad = rows.normalize_split(part.select(idx), name, ds, kind, data.bad_rows, where)
            chosen = np.arange(len(normalized))
            if split_name == "train":
                chosen = weighted(chosen, float(ds.weight), seed)
                if len(normalized) and not len(chosen):
                    raise ConfigError(
                        f"data.sets.{name}.weight",
                        f"weight {ds.weight} x the {len(normalized)} rows of its {share} share rounds to 0 rows",
                        f"use a weight of at least {1 / len(normalized):.3g}, or leave the set out",
                    )
            tokenize = {
                "tok": tokenizer,
                "max_len": max_len,
                "policy": data.overlong,
                "chat": chat(ds, name, tokenizer),
            }
            if len(chosen):
                tokenized = normalized.select(chosen).map(
                    kinds.KINDS[kind],
                    batched=True,
                    fn_kwargs=tokenize,
                    remove_columns=normalized.column_names,
                    load_from_cache_file=False,
                )
            else:  # (map over no rows would not create the columns)
                from datasets import Dataset

                tokenized = Dataset.from_dict(kinds.empty(kind))
            overlong = sum(tokenized["overlong"])
            if kind == "prompts" and overlong and data.overlong == "truncate":
                longest = max(len(ids) for ids in tokenized["prompt_ids"])
                raise ConfigError(
                    method.max_len_key,
                    f"{overlong} prompts of data set {name!r} ({where}, "
                    f"{split_name} split) are longer than {method.max_len_key}={max_len} tokens "
                    f"(the longest has {longest}); a prompt cannot be cut without losing its question",
                    f"raise {method.max_len_key} (at most the model's positions minus the answer "
                    "length), or set data.overlong=drop to skip such prompts (they are counted)",
                )
            tokenized = tokenized.filter(lambda r: r["keep"], load_from_cache_file=False)
            tokenized = tokenized.remove_columns(["overlong", "keep"])
            stats[name][split_name] = {
                "rows": len(part),
                **bad,
                "slice_rows": len(idx),
                "weighted_rows": len(chosen),
                "overlong": overlong,
                "overlong_policy": data.overlong,
                "kept": len(tokenized),
            }
            parts[split_name].append(tokenized)
    counts, packed = {}, None
    for split_name, pieces in parts.items():
        merged = concatenate_datasets(pieces) if len(pieces) > 1 else pieces[0]
        counts[split_name] = len(merged)
        if len(merged) == 0:
            raise ConfigError(
                "data.split",
                f"the {method.name} stage gets no {split_name} samples from "
                f"{', '.join(raw)} (split {split}, share {share!r}, max length {max_len})",
                f"give {share} a share in data.split, use more data, or raise the max length",
            )
        if split_name == "train" and data.get("packing"):  # (evaluation stays one sample per row)
            tokens = sum(len(ids) for ids in merged["input_ids"])
            merged = packing.pack_dataset(merged, max_len, seed)
            counts["train_samples"], counts[split_name] = counts[split_name], len(merged)
            packed = {
                "samples": counts["train_samples"],
                "rows": len(merged),
                "fill": round(tokens / (len(merged) * max_len), 4),
            }
        merged.save_to_disk(str(out_dir / split_name))
    return {"counts": counts, "sets": stats, **({"packing": packed} if packed else {})}


def _cached(root: Path, build) -> dict:
    """meta.json of a cache directory, built once (into a temporary sibling, renamed when complete)."""
    if not (root / "meta.json").exists():
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            meta = build(tmp)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
            tmp.rename(root)
        except OSError:
            if not (root / "meta.json").exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first, or the build failed
    return json.loads((root / "meta.json").read_text())


def _key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def share_of(cfg: DictConfig, method) -> str:
    split = split_shares(cfg.data.split)
    for key in method.share_keys():
        if key in split:
            return key
    raise ConfigError(
        "data.split",
        f"has no share for the {method.name} stage (it reads "
        f"{' or '.join(method.share_keys())}; data.split is {split})",
        f"add one, e.g. data.split={{sft:2,{method.share_keys()[0]}:8}}",
    )


def prepare(cfg: DictConfig, method, tokenizer: Callable, cache_root: Path, build: bool = True) -> Prepared | None:
    """Tokenise the train and eval samples of the run's method into the cache (once); return paths and counts.

    `tokenizer()` returns the tokenizer, loaded only when needed: a cache hit on local data with a local tokenizer
    reads no data set and loads no tokenizer (the key hashes their files). `build=False` only looks the cache up
    (None on a miss)."""
    from runner.modeling import tokenizer_key

    share = share_of(cfg, method)
    used = {name: ds for name, ds in cfg.data.sets.items() if not (ds.sft_only and method.data != "sft")}
    if not used:
        raise ConfigError(
            "data",
            f"no data set is used by the {method.name} stage (all are sft_only)",
            "add a data set that is not sft_only",
        )
    raw = {}

    def load(name):
        if name not in raw:
            raw[name] = (used[name], *sources.load_raw(name, used[name], int(cfg.seed)))
        return raw[name]

    content = {
        name: sources.file_fingerprint(str(ds.path)) or sources.content_fingerprint(str(ds.path), *load(name)[1:])
        for name, ds in used.items()
    }
    key_parts = {
        "version": CACHE_VERSION,
        "kind": method.data,
        "share": share,
        "max_len": method.max_len(cfg),
        "seed": int(cfg.seed),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "content": content,
        "tokenizer": tokenizer_key(str(cfg.model.tokenizer), tokenizer),
    }
    root = cache_root / f"{method.name}-{_key(key_parts)}"
    if not build and not (root / "meta.json").exists():
        return None

    def fresh(tmp: Path) -> dict:
        all_raw = {name: load(name) for name in used}
        return {"key": key_parts, **_build(cfg, method, share, tokenizer(), all_raw, tmp)}

    meta = _cached(root, fresh)
    paths = {name: str(root / name) for name in ("train", "eval")}
    stats = {"cache": str(root), "share": share, "sets": meta["sets"]}
    if "packing" in meta:  # data.packing: samples, rows and how full they are
        stats["packing"] = meta["packing"]
    return Prepared(paths=paths, counts=meta["counts"], stats=stats)


def share_notes(prepared: Prepared, split: dict, stage: str) -> list[str]:
    """One line per data set of which the stage trains on a share only (data.split), and how to give it all."""
    share, notes = prepared.stats["share"], []
    shares = ", ".join(f"{k}: {v:g}" for k, v in split.items())
    for name, sets in prepared.stats["sets"].items():
        rows, taken = sets["train"]["rows"], sets["train"]["slice_rows"]
        if taken < rows:
            notes.append(
                f"{stage} trains on its share of data set {name}: {taken} of {rows} rows (data.split={{{shares}}}: "
                f"each stage gets rows of its own); to train on every row, run it alone with data.split={share}"
            )
    return notes


def prepare_text_blocks(spec: DictConfig, key: str, tokenizer, block: int, cache_root: Path) -> dict:
    """A text data set (spec: path, config_name, split, field) tokenised with an eos after each text, concatenated
    and cut into blocks of `block` tokens (as DeepSpeed-Chat groups pretraining text). Cached like `prepare`."""
    from datasets import Dataset

    from runner.modeling import tokenizer_fingerprint

    raw = sources.load(str(spec.path), spec.get("config_name"), [spec.split], f"{key}.path")
    split = raw[spec.split] if spec.split in raw else None
    if split is None:
        raise ConfigError(
            f"{key}.split",
            f"{spec.path} has no split {spec.split!r} (it has {list(raw)})",
            f"set {key}.split to one of {list(raw)}",
        )
    if spec.field not in split.column_names:
        raise ConfigError(
            f"{key}.field",
            f"{spec.path} has no column {spec.field!r} (it has {split.column_names})",
            f"set {key}.field to its text column",
        )
    key_parts = {
        "version": CACHE_VERSION,
        "kind": "text_blocks",
        "block": block,
        "spec": OmegaConf.to_container(spec, resolve=True),
        "content": sources.content_fingerprint(str(spec.path), split, split),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    root = cache_root / f"text-{_key(key_parts)}"

    def build(tmp: Path) -> dict:
        texts = [t for t in split[spec.field] if isinstance(t, str) and t.strip()]
        ids: list[int] = []
        for start in range(0, len(texts), 1000):
            for piece in tokenizer(texts[start : start + 1000], add_special_tokens=False)["input_ids"]:
                ids.extend(piece + [tokenizer.eos_token_id])
        blocks = [ids[i : i + block] for i in range(0, len(ids) - block + 1, block)]
        if not blocks:
            raise ConfigError(
                f"{key}.path",
                f"{spec.path} has {len(ids)} tokens of text, fewer than one block of {block}",
                f"use more text or a smaller {key}.block_size",
            )
        Dataset.from_dict({"input_ids": blocks}).save_to_disk(str(tmp / "train"))
        return {"key": key_parts, "blocks": len(blocks)}

    meta = _cached(root, build)
    return {"path": str(root / "train"), "blocks": meta["blocks"], "block_size": block}


def load_prepared(path: str):
    from datasets import load_from_disk

    return load_from_disk(path)
