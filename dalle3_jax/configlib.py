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


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path.py[:variant]` the way `--config=` does: get_config(variant)."""
    import importlib.util
    import os

    path, _, variant = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    module_spec = importlib.util.spec_from_file_location("_dalle3_jax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant or None) if variant else module.get_config()


def check_overrides(argv: list[str], flag: str = "config") -> None:
    """Fails with a clear message for `--config.a.b=v` overrides naming a key the config lacks.

    absl's own error for a misspelt key is a bare KeyError deep in a traceback; this check runs
    before flag parsing and names the key and the valid keys beside it.
    """
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{flag}=")), None)
    overrides = [a[len(flag) + 3:].split("=", 1)[0] for a in argv if a.startswith(f"--{flag}.")]
    if spec is None or not overrides:
        return
    config = load_config_file(spec)
    for dotted in overrides:
        node, walked = config, flag
        for part in dotted.split("."):
            keys = list(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
            if part not in keys:
                valid = ", ".join(sorted(keys)) or "(none: not a config block)"
                raise SystemExit(f"error: --{flag}.{dotted}: {walked} has no key {part!r}. Valid keys: {valid}")
            node, walked = node[part], f"{walked}.{part}"
