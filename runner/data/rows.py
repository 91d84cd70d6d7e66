"""Rows: one raw row of a data set -> {prompt, chosen, rejected, target} in the model's text format, read as the
data set's YAML says (its format, field mapping, template), for one kind of rows (runner.data.kinds)."""

from __future__ import annotations

import json
from typing import Any

from omegaconf import DictConfig

from runner.errors import ConfigError

EMPTY = {"prompt": "", "chosen": "", "rejected": "", "target": "", "extra": "{}"}
ROLES = {"prompt", "chosen", "rejected", "response", "answer_a", "answer_b", "score_a", "score_b", "label"}


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


def normalize(row: dict, ds: DictConfig, kind: str) -> dict[str, str]:
    """One raw row -> {prompt, chosen, rejected, target}, reading only what rows of `kind` need, or BadRow.
    kind: sft (prompt + the set's sft_target), pairs (prompt, chosen, rejected), prompts (prompt)."""
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
        chosen, rejected = chosen_full[len(prompt) :], rejected_full[len(prompt) :]
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
        elif ds.format == "pairs":  # read only the columns this kind uses (SFT-only sets may have no pairs)
            sft_reads = ds.sft_target if kind == "sft" else None
            chosen = _text(row, f.chosen) if kind == "pairs" or sft_reads == "chosen" else ""
            rejected = _text(row, f.rejected) if kind == "pairs" or sft_reads == "rejected" else ""
        else:
            raise BadRow(f"unknown format {ds.format!r} (use pairs, scored or embedded)")
        prompt = ds.template.format(prompt=prompt)
        chosen, rejected = (prefix + chosen if chosen else chosen), (prefix + rejected if rejected else rejected)
    if kind == "sft":
        target = {"chosen": chosen, "rejected": rejected}.get(ds.sft_target)
        if target is None:
            target = prefix + _text(row, f[ds.sft_target] if ds.sft_target in f else ds.sft_target)
    else:
        target = ""
    if kind == "pairs" and chosen == rejected:
        raise BadRow("chosen and rejected are identical")
    # any other mapped field (a reference answer, a task id) travels with the row, to the reward functions
    extra = {role: _field(row, dotted) for role, dotted in f.items() if role not in ROLES}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "target": target, "extra": extra}


def read_fields(ds: DictConfig, kind: str) -> dict[str, str]:
    """The fields rows of `kind` read from this data set: {the key that maps it: its (dotted) field}."""
    f, key = ds.fields, "fields."
    if ds.format == "embedded":
        roles = ["chosen", "rejected"]
    elif ds.format == "scored":
        roles = ["prompt", "answer_a", "answer_b", *(["label"] if f.get("label") else ["score_a", "score_b"])]
    else:
        roles = ["prompt", *(["chosen", "rejected"] if kind == "pairs" else [])]
    read = {key + r: f[r] for r in roles}
    if kind == "sft" and not (ds.sft_target in ("chosen", "rejected") and ds.format != "pairs"):
        target = ds.sft_target
        read.update({key + target: f[target]} if target in f else {"sft_target": target})
    return {**read, **{key + r: dotted for r, dotted in f.items() if r not in ROLES}}


def check_columns(split, name: str, ds: DictConfig, kind: str, where: str) -> None:
    """A mapped field that no row has (the file's layout is another) is named with the columns the file has."""
    columns = [c for c in split.column_names if c != "__row__"]
    for key, dotted in read_fields(ds, kind).items():
        if dotted and str(dotted).split(".")[0] not in columns:
            raise ConfigError(
                f"data.sets.{name}.{key}",
                f"no row of {where} has the field {dotted!r}; its columns are: {', '.join(columns)}",
                f"map it to one of them: data.sets.{name}.{key}=<column>",
            )


def normalize_split(split, name: str, ds: DictConfig, kind: str, policy: str, where: str):
    """A split's rows normalised; bad rows stop the run (policy error) or are dropped and counted (skip)."""
    if len(split):
        check_columns(split, name, ds, kind, where)

    def fn(batch: dict) -> dict:
        out: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "target": [], "extra": [], "bad": []}
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        for row in rows:
            place = row.pop("__row__")
            try:
                norm, bad = normalize(row, ds, kind), ""
                norm["extra"] = json.dumps({**norm["extra"], "__row__": f"{where}, {place}"}, default=str)
            except BadRow as exc:
                if policy == "error":
                    fix = "fix the row, or set data.bad_rows=skip to drop such rows (they are counted)"
                    if str(exc).startswith("has no field"):  # a whole file in another layout, most likely
                        roles = ", ".join(f"{r}={v}" for r, v in ds.fields.items() if v)
                        fix = (
                            f"its fields are {', '.join(sorted(row))}; this method reads {kind} rows ({roles}): map "
                            f"them with data.sets.{name}.fields.<role>=<field>, or use a data set of that kind"
                        )
                    raise ConfigError(f"data.sets.{name}", f"{where}, {place}: {exc}", fix) from None
                norm, bad = EMPTY, str(exc)
            for k, v in norm.items():
                out[k].append(v)
            out["bad"].append(bad)
        return out

    if len(split) == 0:  # (map over no rows would not create the columns)
        from datasets import Dataset

        return Dataset.from_dict({k: [] for k in EMPTY}), {"bad_rows_skipped": 0, "bad_row_reasons": {}}
    normalized = split.map(fn, batched=True, remove_columns=split.column_names, load_from_cache_file=False)
    bad = [b for b in normalized["bad"] if b]
    normalized = normalized.filter(lambda r: not r["bad"], load_from_cache_file=False).remove_columns("bad")
    reasons: dict[str, int] = {}
    for b in bad:
        reasons[b] = reasons.get(b, 0) + 1
    return normalized, {"bad_rows_skipped": len(bad), "bad_row_reasons": reasons}
