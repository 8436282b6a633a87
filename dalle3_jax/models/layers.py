"""Transformer building blocks shared by every model: projections, norms, MLP, attention, blocks.

Dimension letters used in docstrings and shape comments:

  B batch   T query positions   S key positions   D model width   F MLP hidden width
  H heads   K per-head width    L cache length

Conventions that every block follows:

* Parameters are stored in `param_dtype` (float32 by default) and cast to the compute `dtype`
  at use, so bfloat16 compute keeps float32 master weights for the optimizer.
* Norm statistics and softmax run in float32 whatever the compute dtype: both are where
  bfloat16's 8-bit mantissa loses the most.
* Every weight names its dimensions with logical axis names (see `dalle3_jax.sharding`), so the
  same module runs on one CPU or an FSDP/tensor-parallel mesh.
* Attention masks are boolean, True = may attend. Masked logits get a large finite negative
  value rather than -inf, so a query with nothing to attend to (e.g. a pad query) yields a
  harmless uniform average instead of NaN.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dalle3_jax import sharding

Dtype = Any
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Large enough to vanish after softmax, small enough not to overflow float32 sums.
NEG_INF = -1e9


def dtype_of(name: str) -> Dtype:
    """A config's dtype name ("float32", "bfloat16", "float16") -> the jnp dtype."""
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def _shape(x: int | Sequence[int]) -> tuple[int, ...]:
    return (int(x),) if isinstance(x, int) else tuple(int(d) for d in x)


class Dense(nnx.Module):
    """y = x · W + b contracting the trailing `in_shape` dims of x into `out_shape`.

    A generalised Linear: attention projections map D -> (H, K) and (H, K) -> D directly, so the
    head dimension is a real weight dimension that can carry the "heads" logical name.
    `names` gives the logical names of the kernel, in_shape dims first, then out_shape dims.
    """

    def __init__(
        self,
        in_shape: int | Sequence[int],
        out_shape: int | Sequence[int],
        names: Sequence[str | None],
        *,
        use_bias: bool = True,
        init_scale: float = 1.0,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_shape, self.out_shape = _shape(in_shape), _shape(out_shape)
        n_in, n_out = len(self.in_shape), len(self.out_shape)
        if len(names) != n_in + n_out:
            raise ValueError(f"Dense{self.in_shape}->{self.out_shape} needs {n_in + n_out} axis names, got {names}")
        # LeCun-normal over the whole (possibly multi-dim) fan-in; init_scale < 1 lets residual
        # branches start small.
        init = nnx.initializers.variance_scaling(
            init_scale, "fan_in", "truncated_normal",
            in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)),
        )
        kernel = init(rngs.params(), self.in_shape + self.out_shape, param_dtype)
        self.kernel = sharding.param(kernel, names)
        self.bias = (
            sharding.param(jnp.zeros(self.out_shape, param_dtype), names[n_in:]) if use_bias else None
        )
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        x_axes = tuple(range(x.ndim - n_in, x.ndim))
        y = jax.lax.dot_general(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), ((x_axes, tuple(range(n_in))), ((), ()))
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Norm(nnx.Module):
    """LayerNorm (scale and bias, mean-centred) or RMSNorm (scale only), computed in float32."""

    def __init__(
        self, dim: int, kind: str = "layernorm", *, eps: float = 1e-6,
        dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
    ):
        if kind not in ("layernorm", "rmsnorm"):
            raise ValueError(f"Unknown norm {kind!r}; expected 'layernorm' or 'rmsnorm'.")
        self.kind, self.eps, self.dtype = kind, eps, dtype
        self.scale = sharding.param(jnp.ones((dim,), param_dtype), ("norm",))
        self.bias = sharding.param(jnp.zeros((dim,), param_dtype), ("norm",)) if kind == "layernorm" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        x = x * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            x = x + self.bias[...].astype(jnp.float32)
        return x.astype(self.dtype)


class MLP(nnx.Module):
    """Position-wise feed-forward: D -> F (GELU) -> D."""

    def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.wi = Dense(dim, hidden, ("embed", "mlp"), **kw)
        self.wo = Dense(hidden, dim, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(self.wi(x))
        # The hidden activation is split like the "mlp" weights on a tensor-parallel mesh.
        h = sharding.constrain(h, ("batch", "length", "act_mlp"))
        return self.wo(h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """jnp.einsum(spec, a, b) read out in float32 (attention logits, vocabulary logits), whose
    backward pass runs in the operands' dtype.

    Under bfloat16 compute the forward matmul takes bfloat16 operands and accumulates and returns
    float32, so the softmax that follows sees unrounded logits. Plain autodiff of that einsum
    would multiply the float32 cotangent with the bfloat16 operands: mixed-dtype matmuls that
    run at float32 speed (in the tiny captioner's train step, 17% of all matmul FLOPs). Here
    the cotangent is rounded to the operands' dtype first, as mixed-precision training does for
    every other activation gradient. With float32 operands this is exactly jnp.einsum.
    """
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_f32_fwd(spec, a, b):
    return einsum_f32(spec, a, b), (a, b)


def _einsum_f32_bwd(spec, residuals, g):
    a, b = residuals
    _, vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), a, b)  # its unused product is dead code
    return vjp(g.astype(jnp.result_type(a, b)))


einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)


def attention_weights_and_values(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                                 bias: jax.Array | None = None, logit_scale: float | None = None) -> jax.Array:
    """Scaled dot-product attention.

    q [B, T, H, K], k and v [B, S, H, K], mask broadcastable to [B, H, T, S] (True = attend),
    bias (e.g. T5's relative position bias) broadcastable to [B, H, T, S], added to the logits.
    logit_scale multiplies q·k: None = 1/sqrt(K); T5 checkpoints use 1.0 (their 1/sqrt(K) was
    folded into the query weights' initialisation). Returns [B, T, H, K] in v's dtype; the logits
    and softmax are float32.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if logit_scale is None else logit_scale
    logits = einsum_f32("bthk,bshk->bhts", q, k) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshk->bthk", weights, v)


def causal_mask(length: int) -> jax.Array:
    """[1, 1, T, T] lower-triangular mask: position t attends to positions <= t."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def key_mask(valid: jax.Array) -> jax.Array:
    """[B, S] validity of keys (e.g. tokens != pad) -> mask [B, 1, 1, S]."""
    return valid[:, None, None, :]


class Attention(nnx.Module):
    """Multi-head attention; self-attention when called without `context`, cross-attention with.

    Query from x [B, T, D]; keys/values from `context` [B, S, Dc] (Dc = `context_dim`, default D)
    or from x itself. For autoregressive decoding, `decode` appends one step's keys/values to a
    preallocated cache and attends over it, and `project_kv` + `attend` let a caller compute
    cross-attention keys/values once and reuse them at every step.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        context_dim: int | None = None,
        head_dim: int | None = None,
        use_bias: bool = True,
        logit_scale: float | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        """head_dim: K (default D / H; H * K may differ from D). use_bias: biases on the four
        projections (T5 has none). logit_scale: see `attention_weights_and_values`."""
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"width {dim} is not divisible by {heads} heads")
            head_dim = dim // heads
        context_dim = dim if context_dim is None else context_dim
        self.heads, self.head_dim, self.logit_scale = heads, head_dim, logit_scale
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = Dense(dim, (heads, head_dim), ("embed", "heads", "kv"), **kw)
        self.key = Dense(context_dim, (heads, head_dim), ("embed", "heads", "kv"), **kw)
        self.value = Dense(context_dim, (heads, head_dim), ("embed", "heads", "kv"), **kw)
        self.out = Dense((heads, head_dim), dim, ("heads", "kv", "embed"), **kw)

    def project_kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        """context [B, S, Dc] -> (k, v), each [B, S, H, K]."""
        k = sharding.constrain(self.key(context), ("batch", "length", "act_heads", None))
        v = sharding.constrain(self.value(context), ("batch", "length", "act_heads", None))
        return k, v

    def attend(self, x: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
               bias: jax.Array | None = None) -> jax.Array:
        """Queries from x [B, T, D] attend to given k, v [B, S, H, K]; returns [B, T, D]."""
        q = sharding.constrain(self.query(x), ("batch", "length", "act_heads", None))
        return self.out(attention_weights_and_values(q, k, v, mask, bias, self.logit_scale))

    def __call__(self, x: jax.Array, context: jax.Array | None = None, *, mask: jax.Array | None = None,
                 bias: jax.Array | None = None) -> jax.Array:
        k, v = self.project_kv(x if context is None else context)
        return self.attend(x, k, v, mask, bias)

    # -- decoding: keys/values are kept heads-major, [B, H, S, K] ---------------------------------
    # One decoding step reads every cached key and value but computes little, so it is bound by
    # memory traffic. With keys laid out [B, H, S, K] the two attention einsums contract over
    # contiguous rows; the [B, S, H, K] layout of the training pass would make XLA transpose the
    # whole cache (and the cross-attention K/V of every image token) at every step.

    def project_kv_cached(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        """context [B, S, Dc] -> (k, v), each [B, H, S, K], for `attend_cached`."""
        k, v = self.project_kv(context)
        return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def attend_cached(self, x: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Queries from x [B, T, D] attend to heads-major k, v [B, H, S, K]; returns [B, T, D]."""
        q = sharding.constrain(self.query(x), ("batch", "length", "act_heads", None))
        scale = 1.0 / math.sqrt(q.shape[-1]) if self.logit_scale is None else self.logit_scale
        logits = einsum_f32("bthk,bhsk->bhts", q, k) * scale
        if mask is not None:
            logits = jnp.where(mask, logits, NEG_INF)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.out(jnp.einsum("bhts,bhsk->bthk", weights, v))

    def init_cache(self, batch: int, length: int, dtype: Dtype) -> dict[str, jax.Array]:
        """Empty self-attention cache: k and v [B, H, L, K] zeros."""
        shape = (batch, self.heads, length, self.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def decode(self, x: jax.Array, index: jax.Array, cache: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
        """One causal self-attention step with a KV cache.

        x [B, T, D] holds the tokens at positions index .. index+T-1 (T = 1 when decoding one
        token at a time). Their keys/values are written into the cache at `index`, and each
        query attends to cache positions <= its own. Returns ([B, T, D], updated cache).
        """
        k_new, v_new = self.project_kv_cached(x)
        start = (0, 0, index, 0)
        k = jax.lax.dynamic_update_slice(cache["k"], k_new.astype(cache["k"].dtype), start)
        v = jax.lax.dynamic_update_slice(cache["v"], v_new.astype(cache["v"].dtype), start)
        length, t = k.shape[2], x.shape[1]
        query_pos = index + jnp.arange(t)
        mask = (jnp.arange(length)[None, :] <= query_pos[:, None])[None, None]  # [1, 1, T, L]
        return self.attend_cached(x, k, v, mask), {"k": k, "v": v}


class Block(nnx.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention, MLP, each residual.

    x [B, T, D]; `context` [B, S, Dc] is required iff the block was built with `cross=True`.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        *,
        cross: bool = False,
        context_dim: int | None = None,
        norm: str = "layernorm",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm_attn = Norm(dim, norm, **kw)
        self.attn = Attention(dim, heads, rngs=rngs, **kw)
        self.cross = cross
        if cross:
            self.norm_cross = Norm(dim, norm, **kw)
            self.cross_attn = Attention(dim, heads, context_dim=context_dim, rngs=rngs, **kw)
        self.norm_mlp = Norm(dim, norm, **kw)
        self.mlp = MLP(dim, mlp_dim, rngs=rngs, **kw)

    def _finish(self, x: jax.Array, cross_kv: tuple[jax.Array, jax.Array] | None, context_mask,
                cached: bool = False) -> jax.Array:
        if self.cross:
            k, v = cross_kv
            attend = self.cross_attn.attend_cached if cached else self.cross_attn.attend
            x = x + attend(self.norm_cross(x), k, v, context_mask)
        x = x + self.mlp(self.norm_mlp(x))
        return sharding.constrain(x, ("batch", "length", "act_embed"))

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None = None,
        context: jax.Array | None = None,
        context_mask: jax.Array | None = None,
        bias: jax.Array | None = None,
    ) -> jax.Array:
        """Full-sequence pass. mask: [B|1, 1|H, T, T] self-attention mask (e.g. causal & key
        validity); context_mask: [B|1, 1|H, T|1, S] validity of context tokens (None = all);
        bias: [B|1, H, T, T] added to the self-attention logits (relative positions)."""
        x = x + self.attn(self.norm_attn(x), mask=mask, bias=bias)
        cross_kv = self.cross_attn.project_kv(context) if self.cross else None
        return self._finish(x, cross_kv, context_mask)

    def decode(
        self,
        x: jax.Array,
        index: jax.Array,
        cache: dict[str, jax.Array],
        cross_kv: tuple[jax.Array, jax.Array] | None = None,
        context_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Incremental pass for positions index .. index+T-1, with cached self-attention and
        precomputed cross-attention keys/values (`Attention.project_kv_cached` of the context)."""
        h, cache = self.attn.decode(self.norm_attn(x), index, cache)
        return self._finish(x + h, cross_kv, context_mask, cached=True), cache
