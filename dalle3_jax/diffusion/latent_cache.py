"""Latents computed once: a T2I config's training records plus their autoencoder latents, as
ArrayRecord shards that a latent run reads instead of decoding and encoding every image.

    python launch/precompute_latents.py --config=configs/t2i.py:image_size=128,autoencoder=tiny --out=DIR
    python launch/train.py --config=configs/t2i.py:image_size=128,autoencoder=tiny,latents=DIR

Each record of `config.data` (the run's training source) is written back whole (id, image,
captions, scene, meta) with one more field, `latent`: the image at input.image_size, encoded by
the run's autoencoder exactly as training would encode it on the fly (diffusion/latent.py: the
posterior mean, or with autoencoder.sample its sample fixed by the record's index), stored as
float32 or float16 bytes with their shape (data/records.py encode_array). With text_states
(`--text_states`), each record also gets `text_states`: a frozen pretrained text encoder's
output for every caption the run's blending can pick (diffusion/text_cache.py); a config
without an autoencoder then makes a cache of text states alone.

    DIR/job.json                        what the latents depend on: source, image size,
                                        autoencoder block, dtype (and `text`: what the text
                                        states depend on); a rerun must match it
    DIR/latents-00003-of-00008.array_record   the records of input range 3, in input order
    DIR/shards/00003.json               shard 3's commit record
    DIR/manifest.json, failures.jsonl, summary.json   at the end

The directory is the recaption job's kind (recaption/writer.py): input range k always becomes
shard k, written under a temp name and renamed into place, then committed, so a killed job
rerun with the same command redoes only unfinished shards. A record whose image cannot be
decoded has no output record and is listed in failures.jsonl. Every process encodes every batch
(the encoder is one program over the whole mesh); process 0 writes.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from dalle3_jax import sharding
from dalle3_jax.data import pipeline, records, sources
from dalle3_jax.diffusion import latent, text_cache
from dalle3_jax.recaption import writer as writer_lib

log = logging.getLogger(__name__)

SHARD_PREFIX = "latents"
DTYPES = records.ARRAY_DTYPES


class LatentDir(writer_lib.OutputDir):
    """The output directory of a latent cache (the recaption job's layout, its own shard names)."""

    def shard_file(self, k: int) -> str:
        return f"{SHARD_PREFIX}-{k:05d}-of-{self.num_shards:05d}.array_record"


def job_of(config: ml_collections.ConfigDict, dtype: str) -> dict[str, Any]:
    """What a cache's latents depend on (DIR/job.json); a training run checks it with `check_job`."""
    return {"kind": "latent_cache", "data": config.data.to_dict(), "image_size": int(config.input.image_size),
            "autoencoder": {k: v for k, v in config.autoencoder.to_dict().items() if k != "use_cached"},
            "dtype": dtype}


def _encode_range(config, mesh, source, start: int, end: int, batch_size: int, dtype: str, out,
                  text=None) -> dict:
    """Writes the records of source[start:end] with their latents (with an autoencoder) and text
    states (`text`: (FrozenText, Tokenize)) to `out` (None: compute only); returns the shard's
    commit record (counts and failures)."""
    size, failures, encode_images = int(config.input.image_size), [], latent.settings(config) is not None
    for lo in range(start, end, batch_size):
        good, images = [], []
        for i in range(lo, min(lo + batch_size, end)):
            rec = source[i]
            if not encode_images:  # a text-only cache leaves images to the training pipeline
                good.append((i, rec))
                continue
            try:
                images.append(pipeline.model_image(rec["image"], size))
            except Exception as e:  # one undecodable image costs its record, not the job
                failures.append({"id": str(rec.get("id", f"#{i}")), "index": i, "reason": "bad_image",
                                 "detail": f"{type(e).__name__}: {e}"})
                continue
            good.append((i, rec))
        if not good:
            continue
        added: list[dict] = [{} for _ in good]
        if encode_images:
            z = latent.to_model_space(config, mesh, np.stack(images), np.array([i for i, _ in good]), batch_size)
            for extra, zi in zip(added, z):
                extra["latent"] = records.encode_array(zi.astype(dtype))
        if text is not None:
            states = text_cache.record_fields(*text, config, [rec for _, rec in good], batch_size, dtype)
            for extra, field in zip(added, states):
                extra[text_cache.TEXT_KEY] = field
        if out is not None:
            for (_, rec), extra in zip(good, added):
                out.write({**rec, **extra})
    by_reason = {"bad_image": len(failures)} if failures else {}
    return {"input_start": start, "input_end": end, "inputs": end - start, "failed": len(failures),
            "failed_by_reason": by_reason, "empty_captions": 0, "failures": failures}


def precompute(config: ml_collections.ConfigDict, out_dir: str, *, num_shards: int = 1, batch_size: int = 64,
               dtype: str = "float32", mesh=None, text_states: bool = False) -> dict[str, Any]:
    """Writes the latent cache of T2I config `config` into `out_dir` (see the module docstring);
    returns the manifest. Shards already committed by an earlier run of the same job are kept.
    text_states: also store the frozen text encoder's states of every caption the run's
    blending can pick (diffusion/text_cache.py); without an autoencoder, only those."""
    if latent.settings(config) is None and not text_states:
        raise ValueError("the config has no autoencoder (set autoencoder.pretrained or autoencoder.variant, "
                         "e.g. configs/t2i.py:image_size=128,autoencoder=tiny) and text states were not asked "
                         "for (text_states=True / --text_states): nothing to cache")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; valid: {', '.join(DTYPES)}")
    mesh = mesh or sharding.make_mesh(config.mesh)
    text = None
    if text_states:
        from dalle3_jax.trainers import t2i

        text = (text_cache.FrozenText(config, mesh), t2i.load_tokenize(config))
    source = sources.make_source(config.data)
    n, shards, primary = len(source), int(num_shards), jax.process_index() == 0
    if not 1 <= shards <= max(n, 1):
        raise ValueError(f"num_shards={shards} must be in [1, {n}] for {n} records")
    out, job = LatentDir(out_dir, shards), job_of(config, dtype)
    if text_states:  # only then: caches made before text states keep their job.json
        job["text"] = text_cache.job_of(config, dtype)
    if out.read_job() is None:
        if primary:
            out.write_job(job)
    else:
        out.check_job(job)
    commits = []
    for k in range(shards):
        start, end = k * n // shards, (k + 1) * n // shards
        done = out.committed(k)
        if done is not None:
            commits.append(done)
            continue
        writer = None
        if primary:
            out.remove_stale(k)
            writer = out.open_shard(k)
        try:
            record = _encode_range(config, mesh, source, start, end, batch_size, dtype, writer, text)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if writer is not None:
            out.commit(k, writer, record)
            commits.append(out.committed(k))
        log.info("latent cache %s: shard %d/%d (%d records)", out_dir, k + 1, shards, end - start)
    if not primary:
        return {}
    written = sum(c["written"] for c in commits)
    return out.finish(job, commits, {"inputs": n, "written": written, "failed": n - written})


def read_cache_job(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """The job.json of a run's records when data.arrayrecord_pattern names a directory that has one."""
    pattern = config.data.get("arrayrecord_pattern", "")
    path = os.path.join(pattern, writer_lib.JOB_FILE) if pattern and os.path.isdir(pattern) else ""
    return writer_lib.read_json(path) if path and os.path.isfile(path) else None


def check_job(config: ml_collections.ConfigDict) -> None:
    """For a run with autoencoder.use_cached: its records' job.json (when the pattern names a
    directory that has one) must describe this run's image size and autoencoder."""
    pattern = config.data.get("arrayrecord_pattern", "")
    job = read_cache_job(config)
    if job is None:
        return
    mine = job_of(config, job.get("dtype", "float32"))
    for key in ("image_size", "autoencoder"):
        if job.get(key) != mine[key]:
            raise ValueError(f"the latent cache {pattern} was made with {key}={job.get(key)!r}, this run uses "
                             f"{mine[key]!r}; rerun launch/precompute_latents.py with this run's config")
