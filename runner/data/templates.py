"""A data set's text keys, checked at planning: the prompt `template` (one `{prompt}` placeholder, no other), the
`answer_prefix` and the embedded format's `delimiter`.

A newline typed on a command line arrives as the two characters `\\n` (a shell passes it as typed, and Hydra's
quoted strings keep it): the runner reads it as the newline it means, and says so in a note.
"""

from __future__ import annotations

import string

from omegaconf import DictConfig

from runner.errors import ConfigError

TEXT_KEYS = ("template", "answer_prefix", "delimiter")
TYPED_NEWLINE = "\\n"


def check(ds: DictConfig, key: str, notes: list[str]) -> None:
    """Check and settle the text keys of the data set at `key` (data.sets.<name>), in place."""
    for name in TEXT_KEYS:
        value = ds.get(name)
        if isinstance(value, str) and TYPED_NEWLINE in value:
            ds[name] = value.replace(TYPED_NEWLINE, "\n")
            notes.append(f"{key}.{name}: read each typed \\n as a newline: {ds[name]!r}")
    template = str(ds.template)
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:  # an unmatched brace
        raise ConfigError(
            f"{key}.template", f"{template!r} is not a valid template ({exc})", "write a literal brace as {{ or }}"
        ) from None
    if "prompt" not in fields:
        raise ConfigError(
            f"{key}.template",
            f"{template!r} has no {{prompt}} placeholder",
            "e.g. '\\n\\nHuman: {prompt}\\n\\nAssistant:'",
        )
    if fields - {"prompt"}:
        raise ConfigError(
            f"{key}.template",
            f"{template!r} has placeholders other than {{prompt}}: {sorted(fields - {'prompt'})}",
            "keep only {prompt}; write a literal brace as {{ or }}",
        )
