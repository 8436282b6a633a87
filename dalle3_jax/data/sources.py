"""Data sources: random access to records in the schema of dalle3_jax.data.records.

Every source has the same small interface, the one Grain's samplers need:

    len(source)          number of records
    source[i]            the record dict for index i (0 <= i < len; negative i counts from the
                         end, anything else raises IndexError)
    pickle.dumps(source) works: Grain's worker processes receive the source by pickling, so
                         sources keep only paths and settings and open files lazily per process.

Records hand out "image" as encoded bytes (ArrayRecord, TFDS) or as an np.uint8 [H, W, 3] array
(synthetic world); records.decode_image accepts both, so pipelines never need to know which.

Sources:
    WorldSource        the built-in synthetic world (dalle3_jax.data.world), imported lazily
    ArrayRecordSource  shards written by this project (launch/prepare.py, the recaptioner)
    TfdsSource         any TFDS dataset in array_record format with an image and text features

make_source(config) builds one from the `data` section of a config; default_data_config()
documents every field.
"""

from __future__ import annotations

import glob
import os
import uuid
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from dalle3_jax.data.records import RecordError, decode_image, decode_record, encode_record, normalise_caption

SOURCES = ("world", "arrayrecord", "tfds")

# One record per ArrayRecord group: random access reads exactly one record. Images are already
# compressed, so compressing the chunk again would only cost CPU on every read.
_WRITER_OPTIONS = "group_size:1,uncompressed"


def _check_index(i: Any, n: int) -> int:
    i = int(i.__index__()) if not isinstance(i, int) else i
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"record index {i} out of range for a source of {n} records")
    return i


# ----------------------------------------------------------------------------- ArrayRecord


def expand_paths(paths_or_glob: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """A glob, a file, a directory (all its *.array_record) or a list of those -> sorted files."""
    items = [paths_or_glob] if isinstance(paths_or_glob, (str, os.PathLike)) else list(paths_or_glob)
    out: list[str] = []
    for item in items:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.array_record")))
        elif glob.has_magic(item):
            found = sorted(glob.glob(item))
        else:
            found = [item] if os.path.isfile(item) else []
        if not found:
            raise FileNotFoundError(f"no ArrayRecord files match {item!r}")
        out.extend(found)
    return out


class ArrayRecordSource:
    """Records from ArrayRecord shards written by ArrayRecordShardWriter, decoded on access."""

    def __init__(self, paths_or_glob: str | os.PathLike | Sequence[str | os.PathLike]):
        self.paths = expand_paths(paths_or_glob)
        self._reader = None
        self._len = len(self._open())

    def _open(self):
        if self._reader is None:
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            self._reader = ArrayRecordDataSource(self.paths)
        return self._reader

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i) -> dict:
        i = _check_index(i, self._len)
        return self._decode(self._open()[i], i)

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        # Batched reads let the ArrayRecord reader fetch from several shards in parallel.
        idx = [_check_index(i, self._len) for i in indices]
        return [self._decode(raw, i) for raw, i in zip(self._open().__getitems__(idx), idx)]

    def read_raw(self, i) -> bytes:
        """The stored msgpack bytes of record i (for copying records without decoding them)."""
        return self._open()[_check_index(i, self._len)]

    def _decode(self, raw: bytes, i: int) -> dict:
        try:
            return decode_record(raw)
        except RecordError as e:
            raise RecordError(e.reason, f"record {i} of {self!r}: {e}") from None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_reader"] = None  # readers hold file handles; each process opens its own
        return state

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.paths)} files, {self._len} records, first={self.paths[0]!r})"


class ArrayRecordShardWriter:
    """Writes one ArrayRecord shard, committed atomically: temp file, then rename on close.

        with ArrayRecordShardWriter(path) as w:
            w.write(record_dict)      # or w.write_raw(msgpack_bytes)

    If the block raises, the temp file is deleted and `path` is left untouched, so a reader (or a
    resumed job) sees either the whole shard or none of it.
    """

    def __init__(self, path: str | os.PathLike):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        # Unique temp name: two writers racing on one path must not share a temp file.
        self._tmp = f"{self.path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._writer = ArrayRecordWriter(self._tmp, _WRITER_OPTIONS)
        self.count = 0

    def write(self, record: dict) -> None:
        self.write_raw(encode_record(record))

    def write_raw(self, data: bytes) -> None:
        self._writer.write(data)
        self.count += 1

    def close(self) -> None:
        """Finishes the file and renames it into place."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drops everything written; `path` is not created."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            if os.path.exists(self._tmp):
                os.remove(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


ShardWriter = ArrayRecordShardWriter


# ----------------------------------------------------------------------------- TFDS


def _resolve(node, parts: Sequence[str], child):
    """Follows a feature path through nested mappings; None if it leads nowhere.

    TFDS feature names may themselves hold "/" (COCO's flat "image/id", "image/filename" next to
    the nested "captions" -> "text"), so at each level the longest run of parts that names a key
    is taken: "image/id" is that flat key, "captions/text" the nested one.
    `child(node, key)` returns the child or raises (KeyError, TypeError, ...).
    """
    i = 0
    while i < len(parts):
        for j in range(len(parts), i, -1):
            try:
                node = child(node, "/".join(parts[i:j]))
            except (KeyError, TypeError, IndexError, ValueError):
                continue
            i = j
            break
        else:
            return None
    return node


def _feature_child(f, key: str):
    while hasattr(f, "feature") and not hasattr(f, "keys"):  # Sequence(...) wraps its element
        f = f.feature
    return f[key]


def _feature_at(features, parts: Sequence[str]):
    """The TFDS feature at a feature path, looking through Sequence features; None if absent."""
    return _resolve(features, parts, _feature_child)


def _value_at(example: Mapping, parts: Sequence[str]):
    v = _resolve(example, parts, lambda node, key: node[key])
    if v is None:
        raise KeyError(f"no value at {'/'.join(parts)!r}")
    return v


def _as_text(v: Any) -> str | bytes | None:
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v.item()
    if isinstance(v, (str, bytes)):
        return v
    if isinstance(v, (int, np.integer)):
        return str(v)
    return None


class TfdsSource:
    """Records from a TFDS dataset prepared in array_record format (no TensorFlow needed).

    image_key / caption_keys / id_key are feature paths; "a/b" reaches into nested features.
    A text feature holding a sequence (COCO: several captions per image) contributes element
    `caption_index` (missing -> ""). Images come back encoded (image decoding is skipped inside
    TFDS, so pipelines decode once, in their own workers); a feature that TFDS hands out as a
    pixel array is returned as np.uint8 [H, W, 3].
    """

    def __init__(self, name: str, split: str, data_dir: str | None = None, image_key: str = "image",
                 caption_keys: Mapping[str, str] | None = None, id_key: str | None = None,
                 caption_index: int = 0):
        self.name, self.split, self.data_dir = name, split, data_dir or None
        self.image_key = image_key
        self.caption_keys = dict(caption_keys if caption_keys is not None else {"alt": "captions/text"})
        if not self.caption_keys:
            raise ValueError("TfdsSource needs at least one caption key")
        self.id_key = id_key or None
        self.caption_index = caption_index
        self._ds = None
        self._len = len(self._open())

    def _open(self):
        if self._ds is not None:
            return self._ds
        import tensorflow_datasets as tfds

        where = f"data_dir={self.data_dir!r}" if self.data_dir else "the default TFDS data_dir"
        try:
            builder = tfds.builder(self.name, data_dir=self.data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise FileNotFoundError(f"TFDS dataset {self.name!r} not found in {where}") from None
        except ImportError:
            # Some builders' code needs TensorFlow (coco_captions does, to declare its features);
            # a dataset prepared elsewhere is read from its own files without that code.
            try:
                builder = tfds.core.read_only_builder.builder_from_files(self.name, data_dir=self.data_dir)
            except tfds.core.registered.DatasetNotFoundError:
                raise FileNotFoundError(f"TFDS dataset {self.name!r} is not prepared in {where} (and its "
                                        f"builder needs TensorFlow to build it: tfds build {self.name} "
                                        "--file_format=array_record on a machine with TensorFlow, then copy "
                                        "the directory)") from None
        if not builder.is_prepared():
            raise FileNotFoundError(f"TFDS dataset {self.name!r} is not prepared in {where}; build it "
                                    f"first (tfds build {self.name} --file_format=array_record)")
        features = builder.info.features
        paths = {"image_key": self.image_key, **{f"caption {k!r}": v for k, v in self.caption_keys.items()}}
        if self.id_key:
            paths["id_key"] = self.id_key
        for what, path in paths.items():
            if _feature_at(features, path.split("/")) is None:
                raise ValueError(f"TfdsSource: {what} {path!r} is not a feature of {self.name!r}; its "
                                 f"features are:\n{features}")
        decoders = None
        image_feature = _feature_at(features, self.image_key.split("/"))
        if isinstance(image_feature, tfds.features.Image):
            decoders = tfds.decode.SkipDecoding()
            for part in reversed(self.image_key.split("/")):
                decoders = {part: decoders}
        self._ds = builder.as_data_source(split=self.split, decoders=decoders)
        return self._ds

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i) -> dict:
        i = _check_index(i, self._len)
        ex = self._open()[i]
        image = _value_at(ex, self.image_key.split("/"))
        if isinstance(image, np.ndarray) and image.dtype.kind in "OSV" and image.ndim == 0:
            image = image.item()  # a scalar bytes tensor (PNG/JPEG stored as a Tensor feature)
        if isinstance(image, np.ndarray):
            image = decode_image(image)  # pixels: make them [H, W, 3] uint8
        elif not isinstance(image, bytes):
            raise RecordError("bad_image", f"{self!r} record {i}: image is {type(image).__name__}")
        captions, normalised = {}, []
        for cname, path in self.caption_keys.items():
            v = _value_at(ex, path.split("/"))
            if isinstance(v, (list, tuple)) or (isinstance(v, np.ndarray) and v.ndim > 0):
                v = v[self.caption_index] if len(v) > self.caption_index else None
            try:
                captions[cname], why = normalise_caption(_as_text(v))
                normalised += [f"{cname}:{w}" for w in why]
            except RecordError as e:  # "" = no caption; pipelines treat it as unconditional
                captions[cname] = ""
                normalised.append(f"{cname}:{e.reason}")
        if self.id_key:
            raw_id = _as_text(_value_at(ex, self.id_key.split("/")))
            rid = raw_id.decode("utf-8", "replace") if isinstance(raw_id, bytes) else raw_id
        else:
            rid = None
        meta: dict = {"source": f"tfds:{self.name}/{self.split}", "index": i}
        if normalised:
            meta["normalised"] = normalised
        return {"id": rid or f"{self.name}/{self.split}/{i}", "image": image, "captions": captions, "meta": meta}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_ds"] = None
        return state

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, {self._len} records)"


# ----------------------------------------------------------------------------- factory


def default_data_config() -> ml_collections.ConfigDict:
    """The `data` config section that make_source reads, with its defaults."""
    c = ml_collections.ConfigDict()
    # Which source to read: "world" (built-in synthetic shapes world, no download),
    # "arrayrecord" (shards from launch/prepare.py or the recaptioner) or "tfds".
    c.source = "world"
    # Split name. World: train | finetune | eval | judge. ArrayRecord: substituted for
    # "{split}" in arrayrecord_pattern (if the pattern has it).
    c.split = "train"
    # Overrides of WorldConfig fields, e.g. {"image_size": 32}; empty = the world's defaults.
    c.world = ml_collections.ConfigDict()
    # Glob, file or directory of ArrayRecord shards, e.g. "data/prepared/prepared-*.array_record".
    c.arrayrecord_pattern = ""
    # TFDS dataset name (with optional config/version, e.g. "coco_captions/2017").
    c.tfds_name = ""
    # TFDS split, e.g. "train" or "train[:1000]"; independent of `split` (names differ).
    c.tfds_split = "train"
    # Directory holding the prepared TFDS dataset; "" = TFDS's default (~/tensorflow_datasets).
    c.tfds_data_dir = ""
    # Feature path of the image ("a/b" for nested features).
    c.tfds_image_key = "image"
    # Caption name -> feature path; sequences (several captions per image) give their first.
    c.tfds_caption_keys = ml_collections.ConfigDict({"alt": "captions/text"})
    # Feature path of a unique example id; "" = "<name>/<split>/<index>".
    c.tfds_id_key = ""
    return c


def make_source(data_config) -> Any:
    """Builds the source named by data_config.source (see default_data_config for the fields)."""
    kind = str(data_config.get("source", "")).lower()
    if kind == "world":
        from dalle3_jax.data.world import WorldConfig, WorldSource

        overrides = data_config.get("world") or {}
        if hasattr(overrides, "to_dict"):
            overrides = overrides.to_dict()
        return WorldSource(data_config.get("split", "train"), WorldConfig(**dict(overrides)))
    if kind == "arrayrecord":
        pattern = data_config.get("arrayrecord_pattern", "")
        if not pattern:
            raise ValueError("data.source='arrayrecord' needs data.arrayrecord_pattern (a glob of shards)")
        if "{split}" in pattern:
            pattern = pattern.replace("{split}", data_config.get("split", "train"))
        return ArrayRecordSource(pattern)
    if kind == "tfds":
        name = data_config.get("tfds_name", "")
        if not name:
            raise ValueError("data.source='tfds' needs data.tfds_name")
        keys = data_config.get("tfds_caption_keys") or {"alt": "captions/text"}
        if hasattr(keys, "to_dict"):
            keys = keys.to_dict()
        return TfdsSource(name, data_config.get("tfds_split", "train"),
                          data_dir=data_config.get("tfds_data_dir") or None,
                          image_key=data_config.get("tfds_image_key", "image"),
                          caption_keys=keys, id_key=data_config.get("tfds_id_key") or None)
    raise ValueError(f"unknown data.source {data_config.get('source')!r}; valid choices: {', '.join(SOURCES)}")
