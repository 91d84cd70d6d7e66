"""Raw data: a data set's train and eval splits as `datasets.Dataset`s, from the hub or local files (json, jsonl,
csv, parquet, a directory of split files, a save_to_disk directory), and a fingerprint of their content."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig

from runner.errors import ConfigError
from runner.paths import is_local_path, local

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _quiet() -> None:
    import datasets

    datasets.utils.logging.set_verbosity(50)  # CRITICAL: errors are reported once, by the runner
    datasets.disable_progress_bars()


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
            raise ConfigError(
                key,
                f"directory {path} has no {'/'.join(splits)} files ({', '.join(BUILDERS)}) "
                "and is not a save_to_disk directory",
                "put train.jsonl (and eval.jsonl) there, or point the path at a file",
            )
        builders = {BUILDERS[Path(f).suffix] for f in files.values()}
        if len(builders) > 1:
            raise ConfigError(key, f"directory {path} mixes file formats {sorted(builders)}", "use one format")
        return load_dataset(builders.pop(), data_files=files)
    if path.suffix not in BUILDERS:
        raise ConfigError(
            key,
            f"unsupported file type {path.suffix!r} for {path}",
            f"use one of {', '.join(BUILDERS)}, or a save_to_disk directory",
        )
    return load_dataset(BUILDERS[path.suffix], data_files={"train": str(path)})


def load(path: str, config_name: str | None, splits: list[str], key: str):
    """A DatasetDict (or Dataset) from a hub id or local path; any loading failure is a ConfigError naming `key`."""
    from datasets import load_dataset

    _quiet()
    try:
        if is_local_path(path):
            if not local(path).exists():
                raise ConfigError(
                    key,
                    f"{path!r} does not exist",
                    "give a json/jsonl/csv/parquet file, a directory of split files, or a hub id",
                )
            return _load_files(local(path), splits, key)
        return load_dataset(path, config_name)
    except ConfigError:
        raise
    except Exception as exc:  # unreadable file, malformed JSON, hub not reachable, ...
        while type(exc).__name__ == "DatasetGenerationError" and exc.__cause__ is not None:
            exc = exc.__cause__  # datasets wraps the real reason (e.g. "JSON parse error: ... in row 0")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if is_local_path(path):
            first = _file_problem(local(path), splits) or first
        raise ConfigError(
            key,
            f"cannot load {path!r}: {first}",
            "check the file (or, for a hub id, that the hub is reachable or a local copy is given)",
        ) from None


def _file_problem(path: Path, splits: list[str]) -> str | None:
    """What is wrong with a local data file, in a user's terms (an empty file, the first line that is not JSON,
    counted from 1), where datasets' own message says less ("StopIteration", "in row 0" of a block)."""
    files = (
        [path]
        if path.is_file()
        else [path / f"{s}{ext}" for s in splits for ext in BUILDERS if (path / f"{s}{ext}").is_file()]
    )
    for f in files:
        text = f.read_text(errors="replace")
        if not text.strip():
            return f"{f} is empty"
        if f.suffix == ".jsonl" or (f.suffix == ".json" and not text.lstrip().startswith("[")):
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        json.loads(line)
                    except ValueError as exc:
                        return f"{f}, line {number}: not valid JSON ({exc.msg}, column {exc.colno})"
    return None


def load_raw(name: str, ds: DictConfig, seed: int):
    """The train and eval splits of one data set, as `datasets.Dataset`s (eval made from train if it has none)."""
    from datasets import Dataset, DatasetDict

    path = str(ds.path)
    raw = load(
        path, ds.get("config_name"), [s for s in (ds.splits.train, ds.splits.eval) if s], f"data.sets.{name}.path"
    )
    if isinstance(raw, Dataset):
        raw = DatasetDict({"train": raw})
    if ds.splits.train not in raw:
        raise ConfigError(
            f"data.sets.{name}.splits.train",
            f"{path} has no split {ds.splits.train!r} (it has {list(raw)})",
            f"set data.sets.{name}.splits.train to one of {list(raw)}",
        )

    # rows counted from 1, as people count; a local JSON-lines file's rows are its lines, as editors show them
    lines = is_local_path(path) and (
        path.endswith(".jsonl") or (local(path).is_dir() and any(local(path).glob("*.jsonl")))
    )

    def numbered(split, split_name):  # remember each row's place in its file, for error messages
        where = "line" if lines else "row"
        return split.add_column("__row__", [f"{split_name} split, {where} {i + 1}" for i in range(len(split))])

    train = numbered(raw[ds.splits.train], ds.splits.train)
    if ds.splits.eval and ds.splits.eval in raw:
        evaluation = numbered(raw[ds.splits.eval], ds.splits.eval)
    elif ds.splits.eval and is_local_path(path) and Path(path).is_dir():
        raise ConfigError(
            f"data.sets.{name}.splits.eval",
            f"{path} has no {ds.splits.eval!r} split",
            f"add {ds.splits.eval}.jsonl there, or set data.sets.{name}.splits.eval=null for a seeded split of train",
        )
    else:
        parts = train.train_test_split(test_size=float(ds.eval_fraction), seed=seed)
        train, evaluation = parts["train"], parts["test"]
    return train, evaluation


def file_fingerprint(path_value: str) -> str | None:
    """The content of a local data set's files (None for a hub id: its revision is read once it is loaded)."""
    if not is_local_path(path_value) or not local(path_value).exists():
        return None
    return content_fingerprint(path_value)


def content_fingerprint(path_value: str, *splits) -> str:
    """What the raw data is: the files' content for local data, datasets' fingerprint (revision) for the hub."""
    path = local(path_value)
    if not is_local_path(str(path_value)):
        return ":".join(s._fingerprint for s in splits)
    digest = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            digest.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()
