"""Trained captioners as the recaption job uses them: identity, decode settings, sharded decoding.

A captioner is a training run directory (`launch/train.py --workdir=DIR`): DIR/config.json
rebuilds the model and tokenizer, DIR/checkpoints/<step>/ holds the weights. The job works in
two phases, so this module has two halves:

  resolve(name, workdir, step, decode)   reads only config.json and the checkpoint list: the
                                         captioner's identity (absolute checkpoint path, step,
                                         resolved decode settings). Cheap, so a rerun of a
                                         finished job can verify itself without loading weights.
  Captioner(ref, mesh)                   loads the weights onto the mesh and captions batches.

Decoding is deterministic: greedy and beam search depend only on the image, and sampling draws
each caption from a key derived from the record id (not its position in a batch), so a resumed
or re-sharded job writes the same captions.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from dalle3_jax import checkpoint, sharding
from dalle3_jax.data import tokenizer as tokenizer_lib
from dalle3_jax.recaption import decode

# decode.Settings fields plus the sampling seed; max_len 0 means "the model's longest caption".
DECODE_FIELDS = tuple(f.name for f in dataclasses.fields(decode.Settings)) + ("seed",)


def default_decode_config() -> ml_collections.ConfigDict:
    """The job's `decode` block: one setting for every captioner (see decode.Settings)."""
    c = ml_collections.ConfigDict()
    c.max_len = 0  # tokens per caption (eos included); 0 = the captioner run's eval.decode.max_len
    c.method = "greedy"  # greedy | beam | sample; greedy and beam are deterministic per image
    c.beam_size = 4  # beams per image (method=beam)
    c.top_k = 0  # sampling: only the k most likely tokens (0 = all)
    c.top_p = 1.0  # sampling: nucleus mass
    c.temperature = 1.0  # sampling: logits are divided by this
    c.min_len = 0  # eos is banned before this many tokens (min_len = max_len forces full length)
    c.repetition_penalty = 1.0  # > 1 discourages repeated tokens
    c.no_repeat_ngram = 0  # n > 0 bans repeating any n-gram
    c.length_penalty = 0.0  # beam score = log-prob / length**length_penalty
    c.seed = 0  # sampling: caption of record `id` uses key fold_in(key(seed), crc32(id))
    return c


@dataclasses.dataclass(frozen=True)
class CaptionerRef:
    """Who writes a caption: everything the output records and the manifest say about it."""

    name: str  # caption name written into records ("ssc", "dsc")
    workdir: str  # absolute path of the training run
    checkpoint: str  # absolute path of the checkpoint step directory
    step: int
    decode: dict  # resolved decode settings (DECODE_FIELDS)
    image_size: int  # the model's input side

    def identity(self) -> dict[str, Any]:
        """What a job pins in job.json: a rerun must load exactly this."""
        return {"workdir": self.workdir, "checkpoint": self.checkpoint, "step": self.step, "decode": self.decode}

    def provenance(self) -> dict[str, Any]:
        """Stored in every output record's meta: compact, since it is repeated per record."""
        defaults = default_decode_config().to_dict()
        changed = {k: v for k, v in self.decode.items() if k != "method" and v != defaults.get(k)}
        settings = " ".join([self.decode["method"]] + [f"{k}={v}" for k, v in sorted(changed.items())])
        return {"checkpoint": self.checkpoint, "step": self.step, "decode": settings}


def _read_run_config(workdir: str) -> ml_collections.ConfigDict:
    from dalle3_jax.trainers import loop

    config = loop.load_run_config(workdir, "captioner")
    return config


def _resolve_decode(name: str, overrides: dict, run_config: ml_collections.ConfigDict) -> dict:
    unknown = sorted(set(overrides) - set(DECODE_FIELDS))
    if unknown:
        raise ValueError(f"unknown decode settings {unknown}; valid: {list(DECODE_FIELDS)}")
    settings = {**default_decode_config().to_dict(), **overrides}
    longest = int(run_config.model.max_text_len)
    # The length the run was evaluated with: short for the SSC, the full 80 tokens for the DSC.
    evaluated = int(run_config.get("eval", {}).get("decode", {}).get("max_len", longest))
    settings["max_len"] = int(settings["max_len"]) or evaluated
    if settings["max_len"] > longest:
        raise ValueError(f"decode.max_len={settings['max_len']} exceeds captioner {name!r}'s position "
                         f"table (model.max_text_len={longest})")
    decode.Settings(**{k: v for k, v in settings.items() if k != "seed"}).validate()
    return settings


def resolve(name: str, workdir: str, step: int, decode_overrides: dict) -> CaptionerRef:
    """The identity of captioner `name` in `workdir` at `step` (-1 = the latest checkpoint)."""
    workdir = os.path.abspath(workdir)
    config = _read_run_config(workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"captioner {name!r}: {ckpt_dir} does not exist; train it first")
    with checkpoint.Checkpointer(ckpt_dir, read_only=True) as ckpt:
        steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"captioner {name!r}: no finished checkpoint in {ckpt_dir}")
    if step < 0:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"captioner {name!r}: no checkpoint for step {step} in {ckpt_dir}; steps: {steps}")
    settings = _resolve_decode(name, decode_overrides, config)
    return CaptionerRef(name=name, workdir=workdir, checkpoint=os.path.join(ckpt_dir, str(step)), step=int(step),
                        decode=settings, image_size=int(config.model.image_size))


def example_keys(ids: Sequence[str], seed: int, batch: int) -> jax.Array:
    """[batch] PRNG keys, one per record id (rows past len(ids) are padding): sampling draws each
    caption from its own id's key, so where a record lands in a batch never changes its caption."""
    hashes = np.zeros((batch,), np.uint32)
    hashes[: len(ids)] = [zlib.crc32(i.encode("utf-8")) for i in ids]
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), hashes)


class Captioner:
    """A loaded captioner: weights placed on `mesh`, its tokenizer, and its decode settings."""

    def __init__(self, ref: CaptionerRef, mesh: jax.sharding.Mesh):
        from dalle3_jax.trainers import captioner as captioner_task

        self.ref, self.mesh = ref, mesh
        config = _read_run_config(ref.workdir)
        self.tokenize = tokenizer_lib.Tokenize(tokenizer_lib.load_tokenizer(config.tokenizer or None))
        with jax.set_mesh(mesh):
            self.model = sharding.create_sharded(lambda: captioner_task.make_model(config), mesh)
            checkpoint.load_model_weights(os.path.dirname(ref.checkpoint), self.model, step=ref.step)
        self._settings = {k: v for k, v in ref.decode.items() if k != "seed"}
        self._keys_sharding = sharding.batch_sharding(mesh, 1)

    def start(self, images: jax.Array, ids: Sequence[str]) -> jax.Array:
        """Dispatches decoding of a [B, S, S, 3] batch (sharded over the mesh's data axes) and
        returns the token array without waiting for it, so the host can prepare the next batch."""
        rng = None
        if self._settings["method"] == "sample":
            rng = jax.device_put(example_keys(ids, int(self.ref.decode["seed"]), images.shape[0]),
                                 self._keys_sharding)
        with jax.set_mesh(self.mesh):
            return decode.generate(self.model, images, rng=rng, **self._settings)

    def texts(self, tokens: jax.Array, n: int) -> list[str]:
        """The first n captions of a token batch as text (the rest is padding)."""
        return self.tokenize.decode(np.asarray(tokens)[:n]) if n else []
