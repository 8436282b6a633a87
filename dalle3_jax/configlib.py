"""Config helpers shared by every `configs/*.py` file.

Configs follow big_vision's convention: `get_config(arg)` where `arg` is the text after the
colon in `--config=configs/t2i.py:caption=dsc,blend=0.95` or `--config=configs/x.py:tiny`.
`parse_arg` turns that text into a typed ConfigDict so each config reads its variant with
`arg.tiny`, `arg.caption`, ... and a misspelt variant key fails loudly instead of being ignored.
"""

from __future__ import annotations

from typing import Any

import ml_collections


def _coerce(key: str, text: str, default: Any) -> Any:
    """Converts `text` to the type of `default` (the variant's declared type)."""
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on", ""):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"variant key {key!r} expects a boolean, got {text!r}")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"variant key {key!r} expects an integer, got {text!r}") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"variant key {key!r} expects a number, got {text!r}") from None
    return text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses a variant string such as `tiny` or `caption=dsc,blend=0.95`.

    Args:
      arg: the text after the colon of `--config=path.py:...`; None or "" means all defaults.
      **defaults: every key the config accepts, with its default value (which fixes its type).
        A bare word (`tiny`) sets a boolean key to True.

    Returns:
      A locked ConfigDict holding every key of `defaults`, overridden by `arg`.

    Raises:
      ValueError: for a key that is not declared in `defaults`, naming the valid keys.
    """
    values = dict(defaults)
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, text = item.partition("=")
        key = key.strip()
        if key not in defaults:
            valid = ", ".join(sorted(defaults)) or "(none)"
            raise ValueError(f"unknown config variant key {key!r} in {arg!r}; valid keys: {valid}")
        default = defaults[key]
        if not sep and not isinstance(default, bool):
            raise ValueError(f"variant key {key!r} needs a value: write {key}=...")
        values[key] = _coerce(key, text.strip(), default)
    config = ml_collections.ConfigDict(values)
    config.lock()
    return config
