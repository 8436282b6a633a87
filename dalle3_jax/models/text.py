"""The CoCa text decoder: token embedding, a unimodal causal half, a multimodal causal half.

Tokens [B, L] are `bos w1 .. wn eos pad ..` (pads only at the end). The two halves share one
residual stream:

  unimodal    causal self-attention only. Its output at an extra learned CLS token, appended
              after the text, is the sentence representation used for the contrastive loss.
  multimodal  causal self-attention + cross-attention to image tokens [B, N, Dc]; ends in the
              output projection to next-token logits [B, L, V].

The same module is the decoder of the learned prompt upsampler (models/upsampler.py) with no
unimodal half and no CLS token (`cls_token=False`): there the context is a text encoder's token
states, whose padding is masked with `context_mask` [B, 1, 1, N] (True = a real token).

Padding never reaches the text embedding: the real tokens are the non-pad tokens up to and
including the first eos (`token_mask`; whatever follows an eos is padding, whatever its id),
other keys are masked in every self-attention, and the CLS token takes the position id right
after eos (the count of real tokens), not the index where it is appended, so appending more
pads changes neither its inputs nor its position code.

Dimension letters: B batch, L text length, D width, N context (image) tokens, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dalle3_jax import sharding
from dalle3_jax.models import layers


def token_mask(tokens: jax.Array, pad_id: int, eos_id: int) -> jax.Array:
    """tokens [B, L] -> bool [B, L]: True for real tokens (not pad, not after the first eos)."""
    is_eos = tokens == eos_id
    after_eos = (jnp.cumsum(is_eos, axis=1) - is_eos) > 0
    return (tokens != pad_id) & ~after_eos


class TextDecoder(nnx.Module):
    """Causal text transformer with a unimodal and a cross-attending multimodal half."""

    def __init__(
        self,
        *,
        vocab_size: int,
        max_len: int,
        width: int,
        heads: int,
        mlp_dim: int,
        unimodal_layers: int,
        multimodal_layers: int,
        context_dim: int,
        tied_embedding: bool = True,
        cls_token: bool = True,
        norm: str = "layernorm",
        pad_id: int = 0,
        eos_id: int = 2,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.vocab_size, self.max_len, self.width = vocab_size, max_len, width
        self.pad_id, self.eos_id = pad_id, eos_id
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        normal = lambda std, shape: std * jax.random.normal(rngs.params(), shape, param_dtype)  # noqa: E731
        self.token_embed = sharding.param(normal(0.02, (vocab_size, width)), ("vocab", "embed"))
        # One extra row: the CLS token of a full-length sequence sits at position max_len.
        self.pos_embed = sharding.param(normal(0.01, (max_len + 1, width)), ("pos", "embed"))
        # cls_token=False: a decoder that never embeds whole texts has no CLS parameters.
        self.cls = sharding.param(normal(0.02, (width,)), ("embed",)) if cls_token else None
        self.unimodal = nnx.List(
            [layers.Block(width, heads, mlp_dim, norm=norm, rngs=rngs, **kw) for _ in range(unimodal_layers)]
        )
        self.multimodal = nnx.List(
            [
                layers.Block(width, heads, mlp_dim, cross=True, context_dim=context_dim, norm=norm, rngs=rngs, **kw)
                for _ in range(multimodal_layers)
            ]
        )
        self.norm_cls = layers.Norm(width, norm, **kw) if cls_token else None
        self.norm_out = layers.Norm(width, norm, **kw)
        # Tied: logits = h · E^T reuses the input embedding (fewer parameters, and a shared
        # token geometry between reading and writing). Untied: a separate D -> V projection.
        self.head = (
            None if tied_embedding
            else layers.Dense(width, vocab_size, ("embed", "vocab"), use_bias=False, rngs=rngs, **kw)
        )

    # -- pieces ------------------------------------------------------------------------------

    def embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """tokens [B, T] int, positions [T] or [B, T] int -> [B, T, D]."""
        x = jnp.take(self._whole(self.token_embed), tokens, axis=0)
        x = x + jnp.take(self._whole(self.pos_embed), positions, axis=0)
        return sharding.constrain(x.astype(self.dtype), ("batch", "length", "act_embed"))

    @staticmethod
    def _whole(table: nnx.Param) -> jax.Array:
        # Lookups read whole (all-gathered) tables: a gather from an fsdp/tensor-split table would
        # otherwise be resharded by the partitioner the slow way, with a full rematerialisation.
        return sharding.constrain(table[...], (None, None))

    def logits(self, h: jax.Array) -> jax.Array:
        """Final norm + output projection: h [B, T, D] -> float32 logits [B, T, V]."""
        h = self.norm_out(h)
        # Read out in float32 also under bfloat16 compute (layers.einsum_f32): logits rounded to
        # bfloat16's 8-bit mantissa would be off by up to ~0.06 at |logit| 16, straight into the
        # cross-entropy and into the argmax of decoding.
        if self.head is None:
            out = layers.einsum_f32("btd,vd->btv", h, self.token_embed[...].astype(self.dtype))
        else:
            out = layers.einsum_f32("btd,dv->btv", h, self.head.kernel[...].astype(self.dtype))
        return sharding.constrain(out, ("batch", "length", "act_vocab"))

    def _check_length(self, length: int) -> None:
        if length > self.max_len:
            raise ValueError(f"text length {length} exceeds the decoder's max_len {self.max_len}")

    # -- full-sequence passes (training, embedding, uncached decoding) --------------------------

    def run_unimodal(self, tokens: jax.Array, *, with_cls: bool = True) -> tuple[jax.Array, jax.Array | None]:
        """tokens [B, L] -> (hidden [B, L, D], CLS output [B, D] after its norm, or None).

        With `with_cls=False` the CLS token is not appended (captioning-only training and
        decoding do not need it, and the sequence stays L long).
        """
        b, length = tokens.shape
        self._check_length(length)
        if with_cls and self.cls is None:
            raise ValueError("this decoder was built with cls_token=False; call run_unimodal(with_cls=False)")
        valid = token_mask(tokens, self.pad_id, self.eos_id)
        x = self.embed(tokens, jnp.arange(length))
        if with_cls:
            n_real = jnp.sum(valid, axis=1)  # the position right after eos
            cls = self.cls[...] + jnp.take(self._whole(self.pos_embed), n_real, axis=0)
            cls = cls.astype(self.dtype)
            x = jnp.concatenate([x, cls[:, None, :]], axis=1)
            valid = jnp.concatenate([valid, jnp.ones((b, 1), bool)], axis=1)
        mask = layers.causal_mask(x.shape[1]) & layers.key_mask(valid)
        for block in self.unimodal:
            x = block(x, mask=mask)
        if not with_cls:
            return x, None
        return x[:, :length], self.norm_cls(x[:, length])

    def run_multimodal(self, hidden: jax.Array, tokens: jax.Array, context: jax.Array,
                       context_mask: jax.Array | None = None) -> jax.Array:
        """hidden [B, L, D] from `run_unimodal`, tokens [B, L] (for the pad mask), context
        [B, N, Dc], context_mask [B, 1, 1, N] (None = every context token is real)
        -> next-token logits [B, L, V] (float32)."""
        valid = token_mask(tokens, self.pad_id, self.eos_id)
        mask = layers.causal_mask(tokens.shape[1]) & layers.key_mask(valid)
        x = hidden
        for block in self.multimodal:
            x = block(x, mask=mask, context=context, context_mask=context_mask)
        return self.logits(x)

    # -- incremental decoding ------------------------------------------------------------------

    def init_cache(self, batch: int, length: int) -> dict[str, list]:
        """Zeroed self-attention caches for every layer, each k/v [B, H, length, K]."""
        self._check_length(length)
        return {
            "unimodal": [blk.attn.init_cache(batch, length, self.dtype) for blk in self.unimodal],
            "multimodal": [blk.attn.init_cache(batch, length, self.dtype) for blk in self.multimodal],
        }

    def cross_kv(self, context: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
        """Cross-attention keys/values of the image context [B, N, Dc] for every multimodal layer,
        computed once per image and reused at every decoding step."""
        return [blk.cross_attn.project_kv_cached(context) for blk in self.multimodal]

    def decode_step(
        self, tokens: jax.Array, index: jax.Array, cache: dict[str, list], cross_kv: list,
        context_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, list]]:
        """Tokens [B, T] at positions index .. index+T-1 -> (logits [B, T, V], updated cache);
        context_mask [B, 1, 1, N] as in `run_multimodal`."""
        positions = index + jnp.arange(tokens.shape[1])
        x = self.embed(tokens, positions)
        new_uni, new_multi = [], []
        for block, c in zip(self.unimodal, cache["unimodal"]):
            x, c = block.decode(x, index, c)
            new_uni.append(c)
        for block, c, kv in zip(self.multimodal, cache["multimodal"], cross_kv):
            x, c = block.decode(x, index, c, kv, context_mask)
            new_multi.append(c)
        return self.logits(x), {"unimodal": new_uni, "multimodal": new_multi}
