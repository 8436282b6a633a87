"""Text-encoder states computed once: a frozen pretrained encoder's output for every caption a
T2I run can train on, stored in the records of the latent cache job, read instead of running
the encoder in every train step.

    python launch/precompute_latents.py --config=configs/t2i.py:caption=dsc,records=R \\
        --config.model.text_pretrained=/ckpt/t5 --text_states --out=DIR
    python launch/train.py --config=configs/t2i.py:caption=dsc,text_states=DIR --config.model.text_pretrained=/ckpt/t5

A pretrained encoder (`model.text_pretrained`) is frozen, so a caption's encoding never changes
and costs one forward pass in total instead of one per epoch. What is stored per record, in the
field `text_states` (data/records.py):

    {caption name: {"states": [L, D], "mask": [L] (1 = a real token), "pooled": [D]}}

for every caption name the run's blending can pick (`fields`: the chosen field with probability
`blend`, else `alt`), so the per-example choice (data/blend.py, a hash of blend_seed and the
example id) is made at training time exactly as without the cache, and one cache serves any
`blend` and `blend_seed`. The parts are the encoder's own output (model.text), before the
T2I model's trainable token bag, which training still adds from the tokens. Pixel-space runs
can cache text states too (the job then writes no latents); latent runs get both in one record.

Training (`cached_text_states`, the configs/t2i.py `text_states=DIR` variant) sends the cached
arrays to the devices with the tokens. Guidance dropout replaces a dropped caption's tokens and
its cached states alike by the empty caption's (`null_encoding`: computed once at start-up with
the same frozen encoder), so the loss equals the uncached one. Evaluation and sampling encode
their prompts with the model's encoder as before. DIR/job.json records what the states depend
on (`job_of`); a run whose encoder, tokenizer, text length or compute dtype differ, or whose
blending can pick a caption the cache lacks, is refused (`check`).

Dimension letters: N records, B batch, L text length, D encoder width.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dalle3_jax import models, sharding
from dalle3_jax.data import blend as blend_lib
from dalle3_jax.data import pipeline, records
from dalle3_jax.diffusion import losses
from dalle3_jax.models import t5

# Record field of the cached states; the batch keys of one caption's parts are pipeline.TEXT_KEYS.
TEXT_KEY = "text_states"
BATCH_KEYS = pipeline.TEXT_KEYS


def uses_cache(config: ml_collections.ConfigDict) -> bool:
    """Whether a T2I run reads its captions' encoder states from the records."""
    return bool(config.get("cached_text_states", False))


def batch_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The extra host batch keys a train step needs on the devices (none without the cache)."""
    return tuple(BATCH_KEYS.values()) if uses_cache(config) else ()


def fields(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Every caption name the run's blending can pick for an example."""
    choice = blend_lib.from_choice(config.caption, config.blend, config.blend_seed)
    return (choice,) if isinstance(choice, str) else choice.fields()


def _tokenizer_dir(config: ml_collections.ConfigDict) -> str:
    return os.path.abspath(config.tokenizer or config.model.text_pretrained)


def _text_dtype(config: ml_collections.ConfigDict) -> str:
    return str(models.with_compute_dtype(config.model, config.get("compute_dtype", "")).text.dtype)


def job_of(config: ml_collections.ConfigDict, dtype: str) -> dict[str, Any]:
    """What cached states depend on (the `text` entry of the cache's job.json)."""
    tok_file = os.path.join(_tokenizer_dir(config), "tokenizer.json")
    digest = ""
    if os.path.isfile(tok_file):  # the vocabulary itself, not only where it was found
        with open(tok_file, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    return {"fields": list(fields(config)), "text_encoder": os.path.abspath(config.model.text_pretrained),
            "tokenizer": _tokenizer_dir(config), "tokenizer_sha256": digest,
            "max_text_len": int(config.input.max_text_len), "compute_dtype": _text_dtype(config), "dtype": dtype}


def check_encoder(config: ml_collections.ConfigDict) -> None:
    """States can be cached only for a frozen pretrained encoder (a trained one would go stale)."""
    if not config.model.get("text_pretrained"):
        raise ValueError("cached text states need a frozen pretrained text encoder (model.text_pretrained): "
                         "this run trains its text encoder from scratch, so states computed once would go "
                         "stale; set model.text_pretrained to a T5 checkpoint directory, or leave out "
                         "text_states= (configs/t2i.py) and --text_states (launch/precompute_latents.py)")


def check(config: ml_collections.ConfigDict, job: Mapping[str, Any] | None) -> None:
    """For a run with cached_text_states: a frozen encoder, and a cache (`job`: its job.json,
    None when the records have none) made for this run's encoder, tokenizer and captions."""
    if not uses_cache(config):
        return
    check_encoder(config)
    if job is None:
        return
    where = f"the cache {config.data.get('arrayrecord_pattern', '')}"
    cached = job.get("text")
    if cached is None:
        raise ValueError(f"{where} holds no text states; rerun launch/precompute_latents.py with --text_states")
    mine = job_of(config, cached.get("dtype", "float32"))
    missing = sorted(set(mine["fields"]) - set(cached.get("fields", ())))
    if missing:
        raise ValueError(f"{where} has text states of the captions {cached.get('fields')}, but this run's blending "
                         f"can pick {missing}; rerun launch/precompute_latents.py --text_states with this run's "
                         "config")
    for key in ("text_encoder", "tokenizer", "tokenizer_sha256", "max_text_len", "compute_dtype"):
        if cached.get(key) != mine[key]:
            raise ValueError(f"{where} has text states made with {key}={cached.get(key)!r}, this run uses "
                             f"{mine[key]!r}; rerun launch/precompute_latents.py --text_states with this run's "
                             "config")


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode(graphdef, state, tokens):
    enc = nnx.merge(graphdef, state)(tokens)
    return t5.TextEncoding(states=enc.states.astype(jnp.float32), mask=enc.mask.astype(jnp.float32),
                           pooled=enc.pooled.astype(jnp.float32))


class FrozenText:
    """A run's pretrained text encoder alone, on a mesh, as training builds it (same weights,
    same compute dtype); encodes host token arrays."""

    def __init__(self, config: ml_collections.ConfigDict, mesh):
        from dalle3_jax.weights import t5 as t5_weights

        check_encoder(config)
        encoder, _ = t5_weights.load_t5_encoder(config.model.text_pretrained, mesh=mesh, dtype=_text_dtype(config))
        self.graphdef, self.state = nnx.split(encoder)
        self.mesh = mesh

    def encode_host(self, tokens: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
        """tokens int32 [N, L] -> float32 {"states": [N, L, D], "mask": [N, L], "pooled": [N, D]},
        in batches of `batch_size` rounded to the data-parallel size."""
        dp = sharding.data_parallel_size(self.mesh)
        bs = max(dp, batch_size // dp * dp)
        parts: list[t5.TextEncoding] = []
        for start in range(0, len(tokens), bs):
            rows = tokens[start:start + bs]
            # A short batch repeats its last row: one compiled shape for the whole job.
            full = np.concatenate([rows, np.repeat(rows[-1:], bs - len(rows), axis=0)])
            batch = sharding.replicated_to_global({"tokens": full}, self.mesh)
            with jax.set_mesh(self.mesh):
                enc = sharding.to_host(_encode(self.graphdef, self.state, batch["tokens"]))
            parts.append(jax.tree.map(lambda x, n=len(rows): np.asarray(x)[:n], enc))
        return {name: np.concatenate([getattr(p, name) for p in parts]) for name in records.TEXT_STATE_PARTS}


def record_fields(encoder: FrozenText, tokenize, config: ml_collections.ConfigDict, recs: Sequence[Mapping],
                  batch_size: int, dtype: str) -> list[dict]:
    """The `text_states` field of each record: every caption of `fields(config)`, encoded."""
    names, length, out = fields(config), int(config.input.max_text_len), [{} for _ in recs]
    for name in names:
        texts = []
        for rec in recs:
            captions = rec.get("captions") or {}
            if name not in captions:
                raise KeyError(f"record {rec.get('id')} has no caption {name!r} (it has {sorted(captions)}), "
                               f"which this run's blending can pick ({', '.join(names)})")
            texts.append(captions[name])
        tokens, _ = tokenize.encode_batch(texts, length)
        enc = encoder.encode_host(tokens, batch_size)
        for i, field in enumerate(out):
            field[name] = {part: records.encode_array(enc[part][i].astype(dtype)) for part in enc}
    return out


def null_encoding(config: ml_collections.ConfigDict, null_tokens: np.ndarray, mesh) -> t5.TextEncoding:
    """The frozen encoder's output for the empty caption (null_tokens [1, L]): states [1, L, D],
    mask bool [1, L], pooled [1, D], numpy; computed once, at start-up."""
    enc = FrozenText(config, mesh).encode_host(np.asarray(null_tokens), 1)
    return t5.TextEncoding(states=enc["states"], mask=enc["mask"] > 0.5, pooled=enc["pooled"])


def from_batch(batch: Mapping[str, jax.Array]) -> t5.TextEncoding:
    """A device batch's cached states (float16 or float32 as stored) as a float32 TextEncoding."""
    return t5.TextEncoding(states=batch[BATCH_KEYS["states"]].astype(jnp.float32),
                           mask=batch[BATCH_KEYS["mask"]] > 0.5,
                           pooled=batch[BATCH_KEYS["pooled"]].astype(jnp.float32))


def caption_encoder(config: ml_collections.ConfigDict, null_tokens: np.ndarray,
                    ) -> Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array], t5.TextEncoding]:
    """(model, batch, rng) -> the batch's TextEncoding with guidance dropout (diffusion.cond_drop)
    applied: the model's encoder on the tokens, or with cached states the batch's own, dropped
    rows taking the empty caption's tokens and encoding alike (the same rows for both)."""
    p = float(config.diffusion.cond_drop)
    if not uses_cache(config):
        def encode(model, batch, rng):
            return model.encode_text(losses.drop_captions(batch["tokens"], null_tokens, p, rng))

        return encode
    null = null_encoding(config, null_tokens, sharding.make_mesh(config.mesh))

    def encode_cached(model, batch, rng):
        tokens, cached = losses.drop_captions((batch["tokens"], from_batch(batch)), (null_tokens, null), p, rng)
        return model.encode_text(tokens, cached)

    return encode_cached
