"""The one reader of Hugging Face checkpoint directories, shared by every weight importer.

A checkpoint directory as written by `save_pretrained(dir, safe_serialization=True)` holds

    config.json                          the model config
    model.safetensors                    all tensors, or
    model.safetensors.index.json         {"weight_map": {tensor name: shard file}} + the shards

(diffusers names them `diffusion_pytorch_model.safetensors[.index.json]`; both are found). Tensors
are read with `safetensors.numpy`: no PyTorch at run time and no pickle anywhere. A directory that
only has `pytorch_model.bin` / `*.pt` / `*.ckpt` files is refused with a hint to convert it.

    from dalle3_jax.weights import safetensors_io as sio
    cfg = sio.load_config(path)                         # dict from config.json
    tensors = sio.load_tensors(path)                    # {name: np.ndarray}, every tensor
    tensors = sio.open_tensors(path)                    # the same, read lazily on access
    report = sio.assign(model, {                        # fill an nnx model's params
        "blocks.0.attn.query.kernel": ("encoder.layers.0.q_proj.weight", transform),
        ...
    }, tensors, ignore=("*.position_ids",))

`assign` checks every shape (errors name our path, the checkpoint key and both shapes), casts to
the param's dtype, places each value with the existing param's sharding (a model created sharded
stays sharded; an abstract model from `nnx.eval_shape`/`sharding.abstract_state` is filled on
the shardings its ShapeDtypeStructs carry), and by default fails on checkpoint keys nobody used
and on params nobody filled.

bfloat16 tensors (numpy has no bfloat16, so `safetensors.numpy` refuses them) are read from the
file's own header as `ml_dtypes.bfloat16` arrays, which `assign` casts like any other dtype.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

# Weight file names, in the order they are looked for.
SAFETENSORS_SINGLE = ("model.safetensors", "diffusion_pytorch_model.safetensors")
SAFETENSORS_INDEX = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")
# Files that mean "a pickle checkpoint": refused, with a conversion hint.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.bin.index.json")

Transform = Callable[..., np.ndarray]
# our param path -> (checkpoint key, transform or None); the key may be a tuple of keys, in which
# case the transform receives the arrays positionally (e.g. to concatenate several tensors).
MappingSpec = Mapping[str, tuple[str | Sequence[str], Transform | None]]


class CheckpointError(ValueError):
    """A checkpoint directory, file, key or shape that cannot be imported (message says why)."""


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def _directory(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"Checkpoint directory {str(p)!r} does not exist.")
    if not p.is_dir():
        raise CheckpointError(f"{str(p)!r} is not a directory; pass the Hugging Face checkpoint directory "
                              f"(with config.json and model.safetensors).")
    return p


def load_config(path: str | os.PathLike, name: str = "config.json") -> dict[str, Any]:
    """The JSON config `name` (default config.json) of checkpoint directory `path`, as a dict."""
    p = _directory(path) / name
    if not p.is_file():
        raise CheckpointError(f"{str(p)!r} not found: a Hugging Face checkpoint directory needs {name}.")
    with open(p) as f:
        return json.load(f)


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of checkpoint directory `path`: the single file, or every shard
    named in the index. CheckpointError for a missing directory, a pickle-only checkpoint, an
    index naming a missing shard, or no weights at all."""
    d = _directory(path)
    for name in SAFETENSORS_INDEX:
        index = d / name
        if index.is_file():
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{str(index)!r} has no 'weight_map'.")
            shards = [d / s for s in dict.fromkeys(weight_map.values())]
            missing = [str(s) for s in shards if not s.is_file()]
            if missing:
                raise CheckpointError(f"{str(index)!r} names shard files that are missing: {missing}")
            return shards
    for name in SAFETENSORS_SINGLE:
        if (d / name).is_file():
            return [d / name]
    found = sorted(d.glob("*.safetensors"))
    if len(found) == 1:
        return found
    pickles = sorted({q.name for pat in PICKLE_PATTERNS for q in d.glob(pat)})
    if pickles:
        raise CheckpointError(
            f"{str(d)!r} only has PyTorch pickle weights ({', '.join(pickles)}); they are never unpickled "
            f"here. Convert to safetensors first, e.g. with transformers: "
            f"`Model.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)`.")
    if len(found) > 1:
        raise CheckpointError(f"{str(d)!r} has several .safetensors files ({[q.name for q in found]}) and no "
                              f"{SAFETENSORS_INDEX[0]} saying which tensors live where.")
    raise CheckpointError(f"No weights in {str(d)!r}: expected {' or '.join(SAFETENSORS_SINGLE + SAFETENSORS_INDEX)}.")


# ----------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------


def _bfloat16_dtype():
    import ml_dtypes  # a dependency of jax

    return ml_dtypes.bfloat16


def _read_raw(file: Path, key: str) -> np.ndarray:
    """One tensor read from the safetensors header by hand (for dtypes numpy lacks: bfloat16)."""
    raw_dtypes = {"BF16": _bfloat16_dtype()}
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        info = header[key]
        if info["dtype"] not in raw_dtypes:
            raise CheckpointError(f"{file}: tensor {key!r} has dtype {info['dtype']} that cannot be read.")
        start, end = info["data_offsets"]
        f.seek(8 + n + start)
        buf = f.read(end - start)
    return np.frombuffer(buf, dtype=raw_dtypes[info["dtype"]]).reshape(info["shape"]).copy()


def _read(file: Path, handle: Any, key: str) -> np.ndarray:
    if handle.get_slice(key).get_dtype() == "BF16":
        return _read_raw(file, key)
    return handle.get_tensor(key)


class LazyTensors(Mapping):
    """Read-on-access mapping name -> np.ndarray over a checkpoint's safetensors files.

    Only the tensors actually looked up are read, so a large checkpoint is never held in host
    memory at once (each tensor is read, transformed and placed on devices by `assign`)."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        self._files = weight_files(path)
        self._where: dict[str, Path] = {}
        self._open = safe_open
        for file in self._files:
            with safe_open(str(file), framework="numpy") as h:
                for k in h.keys():
                    self._where[k] = file

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._where:
            raise KeyError(key)
        file = self._where[key]
        with self._open(str(file), framework="numpy") as h:
            return _read(file, h, key)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of tensor `key` without reading it."""
        with self._open(str(self._where[key]), framework="numpy") as h:
            return tuple(h.get_slice(key).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where


def open_tensors(path: str | os.PathLike) -> LazyTensors:
    """Every tensor of checkpoint directory `path`, read lazily (see LazyTensors)."""
    return LazyTensors(path)


def load_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of checkpoint directory `path` (single file or sharded index), name -> array."""
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    for file in weight_files(path):
        with safe_open(str(file), framework="numpy") as h:
            for k in h.keys():
                out[k] = _read(file, h, k)
    return out


# ----------------------------------------------------------------------------------------------
# Filling an nnx model
# ----------------------------------------------------------------------------------------------


def path_str(path: Iterable[Any]) -> str:
    """An nnx state path ('blocks', 0, 'attn', 'kernel') -> 'blocks.0.attn.kernel'."""
    return ".".join(str(getattr(p, "key", p)) for p in path)


def param_paths(model: nnx.Module | nnx.State, kind: type[nnx.Variable] = nnx.Param) -> dict[str, tuple[int, ...]]:
    """Our param paths ('a.b.0.kernel') -> shape, for writing a mapping."""
    state = model if isinstance(model, nnx.State) else nnx.state(model, kind)
    return {path_str(p): tuple(np.shape(v.get_value())) for p, v in nnx.to_flat_state(state)}


@dataclasses.dataclass
class LoadReport:
    """What `assign` did: filled params, checkpoint keys used / ignored / left unused, params left
    unfilled (both only non-empty when allowed)."""

    filled: list[str]
    used_keys: list[str]
    ignored_keys: list[str]
    unused_keys: list[str]
    unfilled: list[str]

    def summary(self) -> str:
        return (f"{len(self.filled)} params filled from {len(self.used_keys)} checkpoint tensors; "
                f"{len(self.ignored_keys)} ignored, {len(self.unused_keys)} unused, "
                f"{len(self.unfilled)} params left as initialised")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _place(value: np.ndarray, current: Any) -> jax.Array:
    """`value` as a jax.Array with `current`'s dtype and sharding (a jax.Array or an abstract
    ShapeDtypeStruct, with or without a sharding). Each device receives only its own slice."""
    value = np.asarray(value, dtype=current.dtype)
    target = getattr(current, "sharding", None)
    if target is None:
        return jax.device_put(value)
    if getattr(target, "is_fully_replicated", False) and getattr(target, "is_fully_addressable", False):
        return jax.device_put(value, target)
    return jax.make_array_from_callback(value.shape, target, lambda index: value[index])


def assign(
    model: nnx.Module | nnx.State,
    mapping: MappingSpec,
    tensors: Mapping[str, np.ndarray],
    *,
    ignore: Iterable[str] = (),
    allow_unused: bool = False,
    allow_unfilled: Iterable[str] | bool = (),
    kind: type[nnx.Variable] = nnx.Param,
    what: str = "checkpoint",
) -> LoadReport:
    """Fills `model`'s params (variables of type `kind`) from checkpoint `tensors`.

    mapping: our param path ('blocks.0.attn.query.kernel', see `param_paths`) ->
        (checkpoint key, transform) where transform(array) -> array of the param's shape (None =
        identity); the key may be a tuple of keys whose arrays are passed to transform in order.
    ignore: glob patterns of checkpoint keys that are expected to be unused (e.g. buffers such
        as '*.position_ids'). Other unused keys are an error unless `allow_unused`.
    allow_unfilled: glob patterns of our param paths that may stay as initialised (True = any).
        Other params missing from `mapping` are an error.

    Every mismatch found is reported at once in one CheckpointError: a mapping entry naming a
    param we do not have or a key the checkpoint lacks, a shape that disagrees (naming our path,
    the key and both shapes). Values take the param's dtype and its current sharding. `model`
    is updated in place (an nnx.State is updated and can be merged afterwards); returns a LoadReport.
    """
    ignore = tuple(ignore)
    state = model if isinstance(model, nnx.State) else nnx.state(model, kind)
    flat = {path_str(p): v for p, v in nnx.to_flat_state(state)}

    errors: list[str] = []
    for ours, (keys, _) in mapping.items():
        if ours not in flat:
            errors.append(f"mapping names param {ours!r}, which the model does not have")
        for k in (keys,) if isinstance(keys, str) else keys:
            if k not in tensors:
                errors.append(f"param {ours!r} needs {what} key {k!r}, which is missing")
    if errors:
        raise CheckpointError(_format(errors, what))

    unfilled = sorted(set(flat) - set(mapping))
    if allow_unfilled is not True:
        bad = [p for p in unfilled if not _matches(p, tuple(allow_unfilled or ()))]
        if bad:
            errors.append(f"params not filled by the {what} (no mapping entry): {bad}")
    used = {k for keys, _ in mapping.values() for k in ((keys,) if isinstance(keys, str) else keys)}
    unused = sorted(k for k in tensors if k not in used and not _matches(k, ignore))
    ignored = sorted(k for k in tensors if k not in used and _matches(k, ignore))
    if unused and not allow_unused:
        errors.append(f"{what} keys that nothing uses: {unused}")

    # One tensor at a time: read, transform, check the shape, place on the param's sharding.
    # Nothing is written into the model until every shape has been checked, so a failed import
    # leaves it as it was (host memory holds one tensor at a time; the placed values wait on
    # their devices). Shapes are checked even after another error, so one message lists all.
    placed: dict[str, jax.Array] = {}
    for ours, (keys, fn) in mapping.items():
        key_tuple = (keys,) if isinstance(keys, str) else tuple(keys)
        arrays = [tensors[k] for k in key_tuple]
        value = (fn or (lambda x: x))(*arrays)
        current = flat[ours].get_value()
        want = tuple(np.shape(current))
        if tuple(np.shape(value)) != want:
            raw = ", ".join(f"{k} {tuple(np.shape(a))}" for k, a in zip(key_tuple, arrays))
            errors.append(f"shape mismatch for param {ours!r}: expected {want}, got {tuple(np.shape(value))} "
                          f"from {what} key(s) {raw}")
            continue
        if not errors:
            placed[ours] = _place(value, current)
        del arrays, value
    if errors:
        raise CheckpointError(_format(errors, what))

    for ours, value in placed.items():
        flat[ours].set_value(value)
    if not isinstance(model, nnx.State):
        nnx.update(model, state)
    return LoadReport(filled=sorted(placed), used_keys=sorted(used), ignored_keys=ignored,
                      unused_keys=unused, unfilled=unfilled)


def _format(errors: list[str], what: str) -> str:
    return f"Cannot import the {what}:\n  - " + "\n  - ".join(errors)


# ----------------------------------------------------------------------------------------------
# Common transforms (PyTorch layouts -> ours)
# ----------------------------------------------------------------------------------------------


def linear(x: np.ndarray) -> np.ndarray:
    """torch.nn.Linear weight [out, in] -> our Dense kernel [in, out]."""
    return np.ascontiguousarray(np.asarray(x).T)


def linear_to_heads(heads: int) -> Transform:
    """torch Linear [H*K, D] -> our attention q/k/v kernel [D, H, K]."""
    def fn(x: np.ndarray) -> np.ndarray:
        out, d = x.shape
        return np.ascontiguousarray(np.asarray(x).T.reshape(d, heads, out // heads))
    return fn


def bias_to_heads(heads: int) -> Transform:
    """torch Linear bias [H*K] -> our attention q/k/v bias [H, K]."""
    return lambda x: np.asarray(x).reshape(heads, -1)


def heads_to_linear(heads: int) -> Transform:
    """torch Linear [D, H*K] (attention output) -> our out kernel [H, K, D]."""
    def fn(x: np.ndarray) -> np.ndarray:
        d, inner = x.shape
        return np.ascontiguousarray(np.asarray(x).T.reshape(heads, inner // heads, d))
    return fn


def conv2d(x: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [O, I, kh, kw] -> flax/our conv kernel [kh, kw, I, O]."""
    return np.ascontiguousarray(np.asarray(x).transpose(2, 3, 1, 0))
