"""A T5-style text encoder, and the interface every text encoder of the T2I model fills.

    tokens [B, L] --embed--> [B, L, D] --pre-RMSNorm blocks, relative position bias--> RMSNorm
        -> TextEncoding(states [B, L, D], mask [B, L], pooled [B, D])

T5's recipe (Raffel et al., 2020) at small scale: no absolute positions; each head adds a learned
bias to its attention logits that depends only on the bucketed signed distance between query and
key (exact for short distances, logarithmic beyond), computed once and shared by every layer;
RMSNorm before every sub-layer and after the last. Trained from scratch on the shapes world with
the diffusion loss, so it learns exactly the words the denoiser needs.

The same module also represents pretrained T5 checkpoints (dalle3_jax/weights/t5.py imports
them; the T2I trainer freezes them): T5 v1.0 (ReLU feed-forward) and T5 v1.1 / Flan-T5 (gated
GELU), through the options that differ from the scratch default:

    head_dim          K per head; H * K may differ from D (T5's d_kv)
    feed_forward      "mlp" (scratch: biased Dense, tanh GELU) or a T5 one: "relu", "gated-gelu_new",
                      ... ("gated-" = act(x Wi) * (x Wi_linear); activations in FF_ACTIVATIONS)
    use_bias          biases on the attention and T5 feed-forward projections (T5: none)
    scaled_attention  1/sqrt(K) on the logits (T5: off; its scale was folded into the init)
    norm_eps          RMSNorm epsilon (T5's layer_norm_epsilon)

The diffusion model reads a text encoder only through `TextEncoding`, so any encoder that maps
tokens [B, L] to a `TextEncoding` and exposes `width` (D) and `vocab_size` can take this one's
place; a frozen one is excluded from training with `optim.frozen = "^text/"`.

Dimension letters: B batch, L text length, D width, H heads, K per-head width, F MLP width.
"""

from __future__ import annotations

import dataclasses
import functools
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
    # Options that pretrained T5 checkpoints set (see the module docstring); defaults = scratch.
    c.head_dim = 0  # K per head; 0 = width // heads
    c.feed_forward = "mlp"  # mlp | relu | gelu | gelu_new | silu, optionally "gated-" prefixed
    c.use_bias = True  # attention (and T5 feed-forward) biases
    c.scaled_attention = True  # 1/sqrt(K) logit scale
    c.norm_eps = 1e-6  # RMSNorm epsilon
    return models.finish_config(c, VARIANTS, variant, overrides, "T5 encoder")


# T5 feed-forward activations by their Hugging Face names: "gelu" is the exact (erf) GELU,
# "gelu_new" the tanh approximation that T5 v1.1's "gated-gelu" uses.
FF_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
}


def parse_feed_forward(name: str) -> tuple[str, bool]:
    """A T5 feed_forward name ("relu", "gated-gelu_new", ...) -> (activation, gated)."""
    gated = name.startswith("gated-")
    activation = name[len("gated-"):] if gated else name
    if activation not in FF_ACTIVATIONS:
        raise ValueError(f"Unknown feed_forward {name!r}: expected 'mlp' or an activation of "
                         f"{sorted(FF_ACTIVATIONS)}, optionally prefixed with 'gated-'")
    return activation, gated


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

    def __init__(self, heads: int, num_buckets: int, max_distance: int, *, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.num_buckets, self.max_distance = num_buckets, max_distance
        table = 0.02 * jax.random.normal(rngs.params(), (num_buckets, heads), jnp.float32)
        self.table = sharding.param(table.astype(param_dtype), ("pos", "heads"))

    def __call__(self, length: int) -> jax.Array:
        pos = jnp.arange(length)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        bias = jnp.take(self.table[...].astype(jnp.float32), buckets, axis=0)  # [L, L, H]
        return bias.transpose(2, 0, 1)[None]


class FeedForward(nnx.Module):
    """T5's feed-forward: D -> F -> D with act(x Wi), or act(x Wi) * (x Wi_linear) when gated.

    Hugging Face calls the gated pair wi_0 (through the activation) and wi_1 (linear)."""

    def __init__(self, dim: int, hidden: int, feed_forward: str, *, use_bias: bool = False, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        activation, gated = parse_feed_forward(feed_forward)
        self.activation = FF_ACTIVATIONS[activation]
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.wi = layers.Dense(dim, hidden, ("embed", "mlp"), **kw)
        self.wi_linear = layers.Dense(dim, hidden, ("embed", "mlp"), **kw) if gated else None
        self.wo = layers.Dense(hidden, dim, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.activation(self.wi(x))  # [B, L, F]
        if self.wi_linear is not None:
            h = h * self.wi_linear(x)
        h = sharding.constrain(h, ("batch", "length", "act_mlp"))
        return self.wo(h)


class T5Block(nnx.Module):
    """Pre-RMSNorm block: x + attention(norm(x)) with the shared position bias, then x + FF(norm(x)).

    Its attributes are named like `layers.Block`'s, so the scratch encoder's parameter paths (and
    its checkpoints) are those of a self-attention-only `layers.Block`."""

    def __init__(self, width: int, heads: int, mlp_dim: int, *, head_dim: int | None = None,
                 feed_forward: str = "mlp", use_bias: bool = True, scaled_attention: bool = True,
                 norm_eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm_attn = layers.Norm(width, "rmsnorm", eps=norm_eps, **kw)
        self.attn = layers.Attention(width, heads, head_dim=head_dim, use_bias=use_bias,
                                     logit_scale=None if scaled_attention else 1.0, rngs=rngs, **kw)
        self.norm_mlp = layers.Norm(width, "rmsnorm", eps=norm_eps, **kw)
        if feed_forward == "mlp":
            self.mlp = layers.MLP(width, mlp_dim, rngs=rngs, **kw)
        else:
            self.mlp = FeedForward(width, mlp_dim, feed_forward, use_bias=use_bias, rngs=rngs, **kw)

    def __call__(self, x: jax.Array, *, mask: jax.Array, bias: jax.Array) -> jax.Array:
        """x [B, L, D], mask [B, 1, 1, L] key validity, bias [1, H, L, L] -> [B, L, D]."""
        x = x + self.attn(self.norm_attn(x), mask=mask, bias=bias)
        x = x + self.mlp(self.norm_mlp(x))
        return sharding.constrain(x, ("batch", "length", "act_embed"))


class T5Encoder(nnx.Module):
    """Bidirectional transformer encoder with T5 relative position bias (see module docstring)."""

    def __init__(self, *, vocab_size: int, width: int, depth: int, heads: int, mlp_dim: int, num_buckets: int = 32,
                 max_distance: int = 128, pad_id: int = 0, eos_id: int = 2, head_dim: int | None = None,
                 feed_forward: str = "mlp", use_bias: bool = True, scaled_attention: bool = True,
                 norm_eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.vocab_size, self.width = vocab_size, width
        self.pad_id, self.eos_id, self.dtype = pad_id, eos_id, dtype
        embed = 0.02 * jax.random.normal(rngs.params(), (vocab_size, width))
        self.token_embed = sharding.param(embed.astype(param_dtype), ("vocab", "embed"))
        self.rel_bias = RelativePositionBias(heads, num_buckets, max_distance, param_dtype=param_dtype, rngs=rngs)
        block = functools.partial(T5Block, width, heads, mlp_dim, head_dim=head_dim, feed_forward=feed_forward,
                                  use_bias=use_bias, scaled_attention=scaled_attention, norm_eps=norm_eps,
                                  dtype=dtype, param_dtype=param_dtype)
        self.blocks = nnx.List([block(rngs=rngs) for _ in range(depth)])
        self.norm_out = layers.Norm(width, "rmsnorm", eps=norm_eps, dtype=dtype, param_dtype=param_dtype)

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


def create(cfg: ml_collections.ConfigDict | None = None, *, rngs: nnx.Rngs | None = None,
           param_dtype=jnp.float32) -> T5Encoder:
    """The encoder of config `cfg` (default: the S variant), seeded by `rngs` (default seed 0).

    Configs saved before the pretrained-T5 options existed lack them and get the scratch defaults."""
    cfg = config() if cfg is None else cfg
    return T5Encoder(vocab_size=cfg.vocab_size, width=cfg.width, depth=cfg.depth, heads=cfg.heads,
                     mlp_dim=cfg.mlp_dim, num_buckets=cfg.num_buckets, max_distance=cfg.max_distance,
                     pad_id=cfg.pad_id, eos_id=cfg.eos_id, head_dim=cfg.get("head_dim", 0) or None,
                     feed_forward=cfg.get("feed_forward", "mlp"), use_bias=cfg.get("use_bias", True),
                     scaled_attention=cfg.get("scaled_attention", True), norm_eps=cfg.get("norm_eps", 1e-6),
                     dtype=layers.dtype_of(cfg.dtype), param_dtype=param_dtype, rngs=rngs or nnx.Rngs(0))
