"""The Grain input pipeline: records -> shuffled, sharded, tokenised, fixed-shape numpy batches.

Every trainer (captioner pretraining and fine-tuning, T2I diffusion, the evaluation CLIP) and
the recaptioner read data through `make_loader`. Its stages, per process:

    MapDataset.source(source)            any random-access source of records (see below)
      .map_with_index(prepare)           lazy: decode + resize the image, pick the caption
      .shuffle(seed)                     one global permutation, the same in every process
      .repeat(num_epochs)                reshuffled every epoch; None = forever
      [shard]                            process p of P takes block p of every P blocks of B
                                         (its slice of each global batch; see _GlobalBatchSlice)
      .to_iter_dataset(ReadOptions)      threaded reads in source order of the permutation
      skip bad images                    counted in the batch, logged, never silent
      .batch(per-process batch)          stacks images, tokenises captions in one call
      .mp_prefetch(workers)              worker processes when worker_count > 0

A record is a dict with at least `image` (PNG/JPEG bytes, or a uint8 [H, W, C] array as the
synthetic world returns) and `captions` ({name: text}); `id` names it in error messages.

Batches are dicts of numpy arrays (B = global_batch_size / process_count):

    image     float32 [B, S, S, 3] in [-1, 1]; centre-cropped to a square, resized to S
    latent    float32 [B, h, w, C] instead of `image` with cached_latents=True: the records'
              precomputed autoencoder latents (launch/precompute_latents.py); no image decoding
    tokens    int32   [B, L]  bos text eos pad..., L = max_text_len (see tokenizer.py)
    text_states, text_mask, text_pooled   with cached_text=True: the chosen caption's frozen
              text-encoder output [B, L, D], [B, L] (1 = real token), [B, D] as the records
              store it (float16 or float32; diffusion/text_cache.py)
    text_len  int32   [B]     tokens that are not padding (bos and eos included)
    index     int64   [B]     position of the example in the source (exactly-once checks)
    skipped   int32   [B]     bad records skipped just before this example (sum for a count)
    caption, id  object [B]   only with keep_text=True: the selected caption text and record id

Bad images (a decode error, an empty image): with on_bad_image="skip" (default) the record is
dropped, a warning names its id, and the `skipped` field counts it, so a trainer can log the
total; the drop is deterministic, so a resumed run drops the same records. More than
`max_consecutive_bad` in a row raises, because then the data, not a record, is broken. With
on_bad_image="raise" the first bad record raises a ValueError naming it. A record the source
itself cannot read (e.g. a corrupt msgpack entry in an ArrayRecord shard) is not an image
problem: the source's error stops the pipeline, naming the record.

The iterator returned by `iter(make_loader(...))` is a grain DatasetIterator: `get_state()` /
`set_state()` resume at the exact next batch, and grain.checkpoint.CheckpointSave/Restore store
it in an Orbax checkpoint beside the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import grain
import ml_collections
import numpy as np
from absl import flags, logging
from PIL import Image

from dalle3_jax.data import records
from dalle3_jax.data import tokenizer as tokenizer_lib

# Keys of a batch that hold numbers (sent to devices by to_device_batches by default).
DEVICE_KEYS = ("image", "tokens", "text_len")
_BAD = "_bad_record"

CaptionField = str | Callable[[Mapping[str, Any], int], str]


def default_input_config() -> ml_collections.ConfigDict:
    """The `input` block of a training config; every field is a make_loader argument."""
    c = ml_collections.ConfigDict()
    c.global_batch_size = 256  # across all processes; must divide by the process count
    c.image_size = 64  # output side length in pixels
    c.caption_field = "alt"  # key of record["captions"]; blending passes a callable instead
    c.max_text_len = 64  # tokens per caption, bos and eos included
    c.seed = 0  # shuffle seed (each epoch is reshuffled from it)
    c.shuffle = True
    c.num_epochs = ml_collections.config_dict.placeholder(int)  # None: repeat forever
    c.worker_count = 0  # Grain worker processes; 0 = everything in the calling process
    c.worker_buffer_size = 2  # batches each worker prepares ahead
    c.read_threads = 2  # threads per process reading records (helps I/O-bound sources; the
    # world renders under the GIL, so worker processes, not threads, scale it)
    c.drop_remainder = True  # static batch shapes; the last partial batch is dropped
    c.on_bad_image = "skip"  # "skip" (counted, logged) or "raise"
    c.keep_text = False
    return c


# ----------------------------------------------------------------------------------------------
# Per-example work (runs in Grain threads / worker processes; everything here must pickle)


def _to_rgb_array(image: Any) -> np.ndarray:
    """A uint8 [H, W, 3] array from encoded bytes or any array-like image.

    records.decode_image is the project's one decoder: grey, alpha (composited on white),
    16-bit and palette images come out the same here as in prepare and the recaptioner.
    """
    if isinstance(image, (bytearray, memoryview)):
        image = bytes(image)
    arr = records.decode_image(image if isinstance(image, bytes) else np.asarray(image))
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] != 3:
        raise ValueError(f"image has shape {arr.shape}, expected [H, W, 3] with H, W > 0")
    return arr


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crops a uint8 [H, W, 3] image to a square and resizes it to [size, size, 3].

    Cropping (not padding or stretching) keeps shapes round and the scene's proportions; PIL's
    bicubic filter widens with the scale factor, so downsampling is antialiased.
    """
    h, w = image.shape[:2]
    if h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        image = image[top : top + side, left : left + side]
    if image.shape[0] != size:
        image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((size, size), Image.BICUBIC))
    return image


def model_image(image: Any, size: int) -> np.ndarray:
    """Any image (encoded bytes or uint8 array) -> float32 [size, size, 3] in [-1, 1], exactly as
    the loader prepares it (evaluation and recaptioning use this to match training inputs)."""
    image = resize_square(_to_rgb_array(image), size)
    # (x - 127.5) / 127.5 maps 0 and 255 to exactly -1 and 1.
    return (image.astype(np.float32) - np.float32(127.5)) / np.float32(127.5)


@dataclasses.dataclass(frozen=True)
class _Prepare:
    """Record -> example dict with the image ready and the caption text chosen (not tokenised)."""

    num_records: int
    image_size: int
    caption_field: CaptionField
    on_bad_image: str
    keep_id: bool
    cached_latents: bool = False
    cached_text: bool = False

    def __call__(self, index: int, record: Mapping[str, Any]) -> dict[str, Any]:
        # Grain passes an epoch-offset index (epoch * len + position) once the data repeats.
        index = index % self.num_records
        record_id = str(record.get("id", f"#{index}"))
        if self.cached_latents:
            if record.get("latent") is None:
                raise KeyError(f"record {record_id} (source index {index}) has no cached `latent`; write the "
                               "records with launch/precompute_latents.py or unset autoencoder.use_cached")
            pixels = ("latent", records.decode_array(record["latent"]).astype(np.float32))
        else:
            try:
                pixels = ("image", model_image(record["image"], self.image_size))
            except Exception as e:  # any decoder error makes this one record bad, not the run
                if self.on_bad_image == "raise":
                    raise ValueError(f"record {record_id} (source index {index}): bad image: {e}") from e
                return {_BAD: record_id, "index": index, "error": f"{type(e).__name__}: {e}"}
        example = {
            pixels[0]: pixels[1],
            "caption": _select_caption(record, index, self.caption_field, record_id),
            "index": np.int64(index),
        }
        if self.cached_text:
            example.update(_cached_text(record, _caption_name(self.caption_field, record, index), record_id))
        if self.keep_id:
            example["id"] = record_id
        return example


# Batch keys of a caption's cached text-encoder parts (records.TEXT_STATE_PARTS).
TEXT_KEYS = {"states": "text_states", "mask": "text_mask", "pooled": "text_pooled"}


def _caption_name(field: CaptionField, record: Mapping[str, Any], index: int) -> str:
    if isinstance(field, str):
        return field
    if not hasattr(field, "name"):
        raise TypeError("cached text states need the caption's name: caption_field must be a field name or a "
                        f"blend.CaptionBlend, not {type(field).__name__}")
    return field.name(record, index)


def _cached_text(record: Mapping[str, Any], name: str, record_id: str) -> dict[str, np.ndarray]:
    """The cached encoder output of the record's caption `name`, as example entries (TEXT_KEYS)."""
    cached = (record.get("text_states") or {}).get(name)
    if cached is None:
        raise KeyError(f"record {record_id} has no cached text states of caption {name!r}; write the records with "
                       "launch/precompute_latents.py --text_states (and this run's caption choice) or unset "
                       "cached_text_states")
    return {key: records.decode_array(cached[part]) for part, key in TEXT_KEYS.items()}


def _select_caption(record: Mapping[str, Any], index: int, field: CaptionField, record_id: str) -> str:
    if callable(field):
        text = field(record, index)
    else:
        captions = record.get("captions") or {}
        if field not in captions:
            raise KeyError(
                f"record {record_id} has no caption {field!r} (it has {sorted(captions)}); "
                "set input.caption_field to one of those"
            )
        text = captions[field]
    if not isinstance(text, str):
        raise TypeError(f"caption of record {record_id} is {type(text).__name__}, expected str")
    return text


@dataclasses.dataclass(frozen=True)
class _Collate:
    """Stacks examples into a batch and tokenises all captions in one tokenizer call."""

    tokenize: tokenizer_lib.Tokenize
    max_text_len: int
    keep_text: bool

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        captions = [ex["caption"] for ex in examples]
        tokens, lengths = self.tokenize.encode_batch(captions, self.max_text_len)
        key = "latent" if "latent" in examples[0] else "image"
        batch = {
            **{k: np.stack([ex[k] for ex in examples]) for k in TEXT_KEYS.values() if k in examples[0]},
            key: np.stack([ex[key] for ex in examples]),
            "tokens": tokens,
            "text_len": lengths,
            "index": np.array([ex["index"] for ex in examples], dtype=np.int64),
            "skipped": np.array([ex.get("skipped", 0) for ex in examples], dtype=np.int32),
        }
        if self.keep_text:
            batch["caption"] = np.array(captions, dtype=object)
            batch["id"] = np.array([ex.get("id", "") for ex in examples], dtype=object)
        return batch


class _SkipBadIterDataset(grain.IterDataset):
    """Drops bad-record markers, logging each and counting them into the next good example."""

    def __init__(self, parent: grain.IterDataset, max_consecutive_bad: int):
        super().__init__(parent)
        self._max_consecutive_bad = max_consecutive_bad

    def __iter__(self) -> grain.DatasetIterator:
        return _SkipBadIterator(self._parent.__iter__(), self._max_consecutive_bad)

    def __str__(self) -> str:
        return f"SkipBadRecords(max_consecutive_bad={self._max_consecutive_bad})"


class _SkipBadIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, max_consecutive_bad: int):
        super().__init__(parent)
        self._max_consecutive_bad = max_consecutive_bad

    def __next__(self) -> dict[str, Any]:
        skipped = 0
        while True:
            example = next(self._parent)
            if _BAD not in example:
                example["skipped"] = skipped
                return example
            skipped += 1
            logging.warning(
                "skipping record %s (source index %d): %s", example[_BAD], example["index"], example["error"]
            )
            if skipped > self._max_consecutive_bad:
                raise RuntimeError(
                    f"{skipped} consecutive records had bad images (last: {example[_BAD]}: "
                    f"{example['error']}); the data source looks broken"
                )

    # The skip count lives only inside one __next__ call, so the state is the parent's: a
    # restored iterator continues at the same record.
    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class _GlobalBatchSlice(grain.MapDataset):
    """Process `shard`'s rows of every global batch: element i is parent element
    (i // block) * block * num_shards + shard * block + i % block.

    Shuffling happens before this, over the whole source, so global batch k holds the same
    examples for any process count (a run gives the same losses on 1 or N processes) and the
    processes' rows are disjoint. A final partial global batch (finite epochs) is split evenly.
    """

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, block: int, shard: int, num_shards: int):
        super().__init__(parent)
        self._block, self._shard, self._num_shards = block, shard, num_shards
        self._full, rest = divmod(len(parent), block * num_shards)
        self._tail = rest // num_shards

    def __len__(self) -> int:
        return self._full * self._block + self._tail

    def _parent_index(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} elements")
        group, within = divmod(index, self._block)
        if group < self._full:
            return (group * self._num_shards + self._shard) * self._block + within
        return self._full * self._block * self._num_shards + self._shard * self._tail + within

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]

    def _getitems(self, indices: Sequence[int]):
        return self._parent._getitems([self._parent_index(i) for i in indices])

    def __str__(self) -> str:
        return f"GlobalBatchSlice(block={self._block}, shard={self._shard}/{self._num_shards})"


# ----------------------------------------------------------------------------------------------
# The loader


def make_loader(
    source: Any,
    *,
    global_batch_size: int,
    image_size: int,
    tokenizer: Any = None,
    caption_field: CaptionField = "alt",
    max_text_len: int = 64,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 2,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
    on_bad_image: str = "skip",
    max_consecutive_bad: int = 1000,
    keep_text: bool = False,
    cached_latents: bool = False,
    cached_text: bool = False,
) -> grain.IterDataset:
    """Builds the input pipeline over `source` for this process.

    Args:
      source: random access records (`__len__`, `__getitem__`), e.g. WorldSource or
        ArrayRecordSource; see the module docstring for the record format.
      global_batch_size: examples per step across all processes.
      image_size: side of the square output images.
      tokenizer: a Hugging Face tokenizer, a `Tokenize`, a tokenizer directory, or None for the
        packaged shapes-world tokenizer.
      caption_field: name in record["captions"], or `fn(record, index) -> str` where index is
        the record's source index (per-example caption blending hooks in here; it must be a
        pure function of its arguments and its own seed so that resumed runs match).
      max_text_len: L of `tokens`; longer captions are truncated, keeping eos.
      seed: shuffle seed; the same seed gives the same batches on every run.
      shuffle: False keeps source order (evaluation, recaptioning).
      num_epochs: passes over the data; None repeats forever (batches span epoch boundaries).
      worker_count: Grain worker processes (0: prepare records in this process's threads).
      worker_buffer_size: batches each worker keeps ready.
      read_threads: threads per process that read and prepare records.
      process_index, process_count: this process's data shard; default jax.process_index()
        and jax.process_count(). Global batch k is the same examples in the same order for any
        process count; process p reads only its rows [p*B, (p+1)*B) of it, so processes read
        disjoint examples. (With finite num_epochs, a last partial global batch is split evenly
        and its len % process_count leftover records are not read.)
      drop_remainder: drop a final partial batch (only happens with finite num_epochs).
      on_bad_image: "skip" or "raise"; see the module docstring.
      max_consecutive_bad: raise once this many bad records come in a row.
      keep_text: also return `caption` and `id` object arrays (host-side logging only).
      cached_latents: batches carry the records' `latent` fields instead of decoded images.
      cached_text: batches also carry the chosen caption's cached text-encoder output
        (text_states, text_mask, text_pooled; see TEXT_KEYS).

    Returns:
      A grain IterDataset; `iter()` gives a checkpointable DatasetIterator of batch dicts.
    """
    if on_bad_image not in ("skip", "raise"):
        raise ValueError(f"on_bad_image must be 'skip' or 'raise', got {on_bad_image!r}")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by {process_count} processes")
    batch_size = global_batch_size // process_count
    n = len(source)
    shard_len = n // process_count
    if shard_len == 0:
        raise ValueError(f"source has {n} records, fewer than the {process_count} processes")
    if num_epochs is not None and drop_remainder and shard_len * num_epochs < batch_size:
        raise ValueError(f"{num_epochs} epoch(s) of {shard_len} records per process make no batch of {batch_size}")

    tokenize = tokenizer if isinstance(tokenizer, tokenizer_lib.Tokenize) else None
    if tokenize is None:
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = tokenizer_lib.load_tokenizer(tokenizer)
        tokenize = tokenizer_lib.Tokenize(tokenizer)

    ds = grain.MapDataset.source(source)
    ds = ds.map_with_index(_Prepare(n, image_size, caption_field, on_bad_image, keep_text, cached_latents,
                                    cached_text))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    if process_count > 1:
        ds = _GlobalBatchSlice(ds, batch_size, process_index, process_count)
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(read_threads, min(2 * batch_size, 512)))
    it = ds.to_iter_dataset(read)
    it = _SkipBadIterDataset(it, max_consecutive_bad)
    it = it.batch(batch_size, drop_remainder=drop_remainder, batch_fn=_Collate(tokenize, max_text_len, keep_text))
    if worker_count > 0:
        _ensure_flags_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=worker_buffer_size)
        )
    return it


def make_loader_from_config(
    source: Any,
    config: ml_collections.ConfigDict,
    *,
    tokenizer: Any = None,
    caption_field: CaptionField | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    cached_latents: bool = False,
    cached_text: bool = False,
) -> grain.IterDataset:
    """make_loader with its settings from an `input` ConfigDict (see default_input_config).

    `caption_field` overrides config.caption_field (a callable cannot live in a config file);
    `cached_latents` is the training config's autoencoder.use_cached, `cached_text` its
    cached_text_states.
    """
    kwargs = dict(default_input_config().to_dict())
    kwargs.update({k: v for k, v in config.items() if k in kwargs})
    unknown = sorted(set(config.keys()) - set(kwargs))
    if unknown:
        raise ValueError(f"unknown input config fields {unknown}; valid: {sorted(kwargs)}")
    if caption_field is not None:
        kwargs["caption_field"] = caption_field
    return make_loader(
        source, tokenizer=tokenizer, process_index=process_index, process_count=process_count,
        cached_latents=cached_latents, cached_text=cached_text, **kwargs
    )


def steps_per_epoch(num_records: int, global_batch_size: int, process_count: int = 1) -> int:
    """Full batches per epoch, as make_loader slices shards (for schedules and progress bars)."""
    return (num_records // process_count) // (global_batch_size // process_count)


def to_device_batches(
    batches: Iterable[Mapping[str, np.ndarray]], mesh: Any, keys: Sequence[str] | None = DEVICE_KEYS
) -> Iterator[dict[str, Any]]:
    """Turns each host batch into global jax Arrays sharded over the mesh's data axes.

    Args:
      batches: host batches from make_loader (this process's share of each global batch).
      mesh: the training mesh (dalle3_jax.sharding.make_mesh).
      keys: keys to send; None sends every numeric array (strings never go to devices).
    """
    from dalle3_jax import sharding

    for batch in batches:
        if keys is None:
            chosen = {k: v for k, v in batch.items() if isinstance(v, np.ndarray) and v.dtype != object}
        else:
            chosen = {k: batch[k] for k in keys}
        yield sharding.global_batch(chosen, mesh)


def _ensure_flags_parsed() -> None:
    # Grain's worker processes read absl flags, which fail when a library user never ran
    # absl.app; an unparsed FLAGS object would otherwise crash every worker at start.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
