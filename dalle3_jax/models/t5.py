"""A T5-style text encoder, and the interface every text encoder of the T2I model fills.

    tokens [B, L] --embed--> [B, L, D] --pre-RMSNorm blocks, relative position bias--> RMSNorm
        -> TextEncoding(states [B, L, D], mask [B, L], pooled [B, D])

T5's recipe (Raffel et al., 2020) at small scale: no absolute positions; each head adds a learned
bias to its attention logits that depends only on the bucketed signed distance between query and
key (exact for short distances, logarithmic beyond), computed once and shared by every layer;
RMSNorm before every sub-layer and after the last. Trained from scratch on the shapes world with
the diffusion loss, so it learns exactly the words the denoiser needs.

The diffusion model reads a text encoder only through `TextEncoding`, so a frozen imported
encoder (e.g. a pretrained T5 or CLIP text tower for real data) can take this one's place: it
must map tokens [B, L] to a `TextEncoding` and expose `width` (D) and `vocab_size`; freeze it
with `optim.frozen = "^text/"`.

Dimension letters: B batch, L text length, D width, H heads.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dalle3_jax import models, sharding
from dalle3_jax.models import layers, text

# Sizes per variant. tiny: tests. S: the shapes-world recipe (its captions use ~1000 words).
# B: a larger encoder for multi-object scenes and real captions.
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(width=32, depth=1, heads=2, mlp_dim=64),
    "S": dict(width=128, depth=2, heads=4, mlp_dim=256),
    "B": dict(width=256, depth=4, heads=4, mlp_dim=1024),
}


@dataclasses.dataclass
class TextEncoding:
    """What the denoiser reads from a caption.

    states [B, L, D] per-token features (cross-attention keys/values), mask bool [B, L] (True =
    a real token, including bos/eos), pooled [B, D] one vector per caption.
    """

    states: jax.Array
    mask: jax.Array
    pooled: jax.Array


jax.tree_util.register_dataclass(TextEncoding, data_fields=["states", "mask", "pooled"], meta_fields=[])


class TextEncoder(Protocol):
    """Any module mapping tokens [B, L] to a TextEncoding (a frozen import can fill this)."""

    width: int
    vocab_size: int

    def __call__(self, tokens: jax.Array) -> TextEncoding: ...


def config(variant: str = "S", **overrides: Any) -> ml_collections.ConfigDict:
    """The encoder config for `variant`; KeyError for an unknown variant or field."""
    c = ml_collections.ConfigDict()
    c.model = "t5"  # registry name (dalle3_jax.models.get)
    c.variant = variant  # the row of VARIANTS the sizes came from
    c.vocab_size = 1024  # >= the tokenizer's vocabulary
    c.width = 128  # D, token state width (the cross-attention context width)
    c.depth = 2  # transformer blocks
    c.heads = 4  # attention heads
    c.mlp_dim = 256  # MLP hidden width
    c.num_buckets = 32  # relative-position buckets (T5's value)
    c.max_distance = 128  # distances beyond this share the last bucket
    c.pad_id = 0  # padding (and anything after the first eos) is masked out
    c.eos_id = 2  # end of text
    c.dtype = "float32"  # compute dtype; norms and softmax stay float32
    return models.finish_config(c, VARIANTS, variant, overrides, "T5 encoder")


def relative_position_bucket(relative: jax.Array, num_buckets: int, max_distance: int) -> jax.Array:
    """Signed distances (key - query) -> bucket ids in [0, num_buckets), T5's bidirectional scheme.

    Half the buckets are for keys after the query, half for keys before; within a half, the first
    half of the buckets are exact distances 0..n/4-1, the rest grow logarithmically up to
    `max_distance` (short-range order matters most for word order, long-range only roughly).
    """
    half = num_buckets // 2
    bucket = jnp.where(relative > 0, half, 0)
    distance = jnp.abs(relative)
    exact = half // 2
    # log-spaced buckets for distance >= exact; max(distance, 1) keeps log finite where unused.
    log_ratio = jnp.log(jnp.maximum(distance, 1) / exact) / math.log(max_distance / exact)
    far = exact + (log_ratio * (half - exact)).astype(jnp.int32)
    far = jnp.minimum(far, half - 1)
    return bucket + jnp.where(distance < exact, distance, far)


class RelativePositionBias(nnx.Module):
    """Learned per-head bias for each distance bucket: length L -> bias [1, H, L, L]."""

    def __init__(self, heads: int, num_buckets: int, max_distance: int, *, rngs: nnx.Rngs):
        self.num_buckets, self.max_distance = num_buckets, max_distance
        table = 0.02 * jax.random.normal(rngs.params(), (num_buckets, heads), jnp.float32)
        self.table = sharding.param(table, ("pos", "heads"))

    def __call__(self, length: int) -> jax.Array:
        pos = jnp.arange(length)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        bias = jnp.take(self.table[...], buckets, axis=0)  # [L, L, H]
        return bias.transpose(2, 0, 1)[None]


class T5Encoder(nnx.Module):
    """Bidirectional transformer encoder with T5 relative position bias (see module docstring)."""

    def __init__(self, *, vocab_size: int, width: int, depth: int, heads: int, mlp_dim: int, num_buckets: int = 32,
                 max_distance: int = 128, pad_id: int = 0, eos_id: int = 2, dtype=jnp.float32, rngs: nnx.Rngs):
        self.vocab_size, self.width = vocab_size, width
        self.pad_id, self.eos_id, self.dtype = pad_id, eos_id, dtype
        self.token_embed = sharding.param(0.02 * jax.random.normal(rngs.params(), (vocab_size, width)),
                                          ("vocab", "embed"))
        self.rel_bias = RelativePositionBias(heads, num_buckets, max_distance, rngs=rngs)
        self.blocks = nnx.List([layers.Block(width, heads, mlp_dim, norm="rmsnorm", dtype=dtype, rngs=rngs)
                                for _ in range(depth)])
        self.norm_out = layers.Norm(width, "rmsnorm", dtype=dtype)

    def __call__(self, tokens: jax.Array) -> TextEncoding:
        """tokens [B, L] int -> TextEncoding (pooled = mean of the real tokens' final states)."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, L], got shape {tokens.shape}")
        valid = text.token_mask(tokens, self.pad_id, self.eos_id)
        # A whole (gathered) table for the lookup, as in the CoCa decoder: a gather from an
        # fsdp-split table would be resharded the slow way.
        table = sharding.constrain(self.token_embed[...], (None, None))
        x = jnp.take(table, tokens, axis=0).astype(self.dtype)
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        bias = self.rel_bias(tokens.shape[1])
        mask = layers.key_mask(valid)
        for block in self.blocks:
            x = block(x, mask=mask, bias=bias)
        states = self.norm_out(x)
        weights = valid.astype(jnp.float32)[..., None]
        pooled = jnp.sum(states.astype(jnp.float32) * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        return TextEncoding(states=states, mask=valid, pooled=pooled.astype(self.dtype))


def create(cfg: ml_collections.ConfigDict | None = None, *, rngs: nnx.Rngs | None = None) -> T5Encoder:
    """The encoder of config `cfg` (default: the S variant), seeded by `rngs` (default seed 0)."""
    cfg = config() if cfg is None else cfg
    return T5Encoder(vocab_size=cfg.vocab_size, width=cfg.width, depth=cfg.depth, heads=cfg.heads,
                     mlp_dim=cfg.mlp_dim, num_buckets=cfg.num_buckets, max_distance=cfg.max_distance,
                     pad_id=cfg.pad_id, eos_id=cfg.eos_id, dtype=layers.dtype_of(cfg.dtype), rngs=rngs or nnx.Rngs(0))
