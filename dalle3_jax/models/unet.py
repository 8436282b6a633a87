"""The UNet denoiser of the T2I stage: ResNet blocks, self- and cross-attention, text conditioning.

    x [B, H, W, C] noisy image, t [B] timestep, context [B, L, Dc] text token states with mask
    [B, L], cond [B, Dp] pooled text vector  ->  [B, H, W, C] (epsilon or v, see diffusion/)

    conv_in -> per level: ResBlocks (+ attention at `attn_resolutions`), then a stride-2 conv
    -> middle: ResBlock, attention, ResBlock -> per level, mirrored: ResBlocks over the
    concatenated skip, then nearest x2 + conv -> GroupNorm, SiLU, conv_out (zero-initialised)

Conditioning: emb = MLP(sinusoid(t)) + Dense(cond) drives a scale-and-shift of the second
GroupNorm in every ResBlock ("FiLM": h = norm(h) * (1 + scale) + shift). The pooled text thus
reaches every block at every resolution, the way the issue's prototype found colour, shape and
size are learned fastest; attention blocks read the per-token states where a caption names
several objects. An attention block is pre-LayerNorm self-attention (optional), cross-attention
to the text, and an optional MLP (diffusers' transformer blocks have one; the recipe does not).

Layout is NHWC everywhere. A 3x3 convolution is computed by XLA's convolution (default) or as
im2col + one matmul (`conv_impl`); both read the same [3, 3, Cin, Cout] kernel, so checkpoints
do not depend on the choice. Measured on this project's 2-core CPU (benchmarks/bench_unet.py):
XLA's NHWC convolution beat im2col at every shape of the recipe (forward + backward at batch
128: 30 vs 13 GFLOP/s at 32 px x 16 channels, 64 vs 44 at 8 px x 64), because im2col writes
and reads a 9x larger patch tensor; im2col won only at 8 channels.

Dimension letters: B batch, H/W height/width, C channels, L text length, E embedding width.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dalle3_jax import models, sharding
from dalle3_jax.models import layers

# tiny: tests. S: the shapes-world recipe (32 px, ~1.2M parameters, channels 16/32/64, attention
# at 16, 8 and the bottleneck). B: the benchmark's size (channels 64/128/128, like the diffusers
# UNet it is compared against).
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                 self_attn_resolutions=(16,), head_dim=8),
    "S": dict(base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=(16, 8),
              self_attn_resolutions=(8,), head_dim=16),
    "B": dict(base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16, 8),
              self_attn_resolutions=(16, 8), head_dim=32),
}
CONV_IMPLS = ("xla", "im2col")


def config(variant: str = "S", **overrides: Any) -> ml_collections.ConfigDict:
    """The UNet config for `variant`; KeyError for an unknown variant or field."""
    c = ml_collections.ConfigDict()
    c.model = "unet"  # registry name (dalle3_jax.models.get)
    c.variant = variant  # the row of VARIANTS the sizes came from
    c.image_size = 32  # H = W of the (pixel or latent) input
    c.in_channels = 3  # C of the input and output
    c.base_channels = 16  # channels at full resolution; level i has base * channel_mult[i]
    c.channel_mult = (1, 2, 4)  # one entry per resolution level (each after the first halves H, W)
    c.num_res_blocks = 2  # ResBlocks per level on the way down (one more on the way up)
    c.attn_resolutions = (16, 8)  # feature-map sides at which attention blocks follow ResBlocks
    c.mid_attention = True  # an attention block between the two bottleneck ResBlocks
    # Sides at which attention blocks start with self-attention over the feature map (the middle
    # block's side is the smallest level's). Its cost grows with (H*W)^2: at 16 x 16 it took about
    # a third of the S model's train step on a CPU, so the recipe self-attends at 8 only.
    c.self_attn_resolutions = (8,)
    c.attn_mlp_ratio = 0  # MLP after the cross-attention (hidden = ratio * C); 0 = none
    c.head_dim = 16  # channels per attention head (heads = channels / head_dim, at least 1)
    c.context_dim = 128  # Dc, width of the text token states (the text encoder's width)
    c.cond_dim = 128  # Dp, width of the pooled text vector added to the time embedding; 0 = none
    c.groups = 8  # GroupNorm groups (fewer if a level has fewer channels)
    c.conv_impl = "xla"  # "xla" (lax convolution) or "im2col" (one matmul per conv)
    c.dtype = "float32"  # compute dtype ("bfloat16" halves activation memory on accelerators)
    return models.finish_config(c, VARIANTS, variant, overrides, "UNet")


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """t [B] (float timesteps, e.g. 0..999) -> [B, dim] sines and cosines at geometric frequencies."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class GroupNorm(nnx.Module):
    """GroupNorm over [B, H, W, C] with statistics in float32, per-channel scale and bias."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-5):
        self.groups = math.gcd(groups, channels)  # a group count that divides C
        self.eps = eps
        self.scale = sharding.param(jnp.ones((channels,), jnp.float32), ("norm",))
        self.bias = sharding.param(jnp.zeros((channels,), jnp.float32), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        xf = x.astype(jnp.float32)
        # Sums of x and x^2 over the image with channels innermost (contiguous, vectorised), then
        # per group: on CPUs this ran ~2x faster than reducing a [B, H, W, G, C/G] view over three
        # strided axes. Activations here are O(1), so E[x^2] - E[x]^2 loses nothing in float32.
        n = h * w * (c // self.groups)
        s1 = jnp.sum(xf, axis=(1, 2)).reshape(b, self.groups, -1).sum(-1) / n
        s2 = jnp.sum(jnp.square(xf), axis=(1, 2)).reshape(b, self.groups, -1).sum(-1) / n
        inv = jax.lax.rsqrt(jnp.maximum(s2 - jnp.square(s1), 0.0) + self.eps)  # [B, G]
        per_channel = lambda v: jnp.repeat(v, c // self.groups, axis=1)  # noqa: E731  [B, G] -> [B, C]
        a = per_channel(inv) * self.scale[...]
        shift = self.bias[...] - per_channel(s1) * a
        return (xf * a[:, None, None, :] + shift[:, None, None, :]).astype(x.dtype)


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, impl: str = "im2col") -> jax.Array:
    """x [B, H, W, Cin] * kernel [k, k, Cin, Cout] (odd k, padding k // 2 on every side) ->
    [B, ceil(H / stride), ceil(W / stride), Cout]; both implementations compute the same sums."""
    k = kernel.shape[0]
    pad = k // 2
    if impl == "xla":
        return jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(pad, pad), (pad, pad)],
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if impl != "im2col":
        raise ValueError(f"Unknown conv_impl {impl!r}; expected one of {CONV_IMPLS}")
    if k == 1 and stride == 1:
        return jnp.einsum("bhwc,co->bhwo", x, kernel[0, 0])
    b, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    # The k*k shifted views, stacked on the channel axis in (row, col, channel) order: exactly the
    # flattening of the HWIO kernel, so the convolution is one [B*Ho*Wo, k*k*Cin] x [k*k*Cin, Cout]
    # matmul.
    cols = [xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
            for i in range(k) for j in range(k)]
    patches = jnp.concatenate(cols, axis=-1)
    return jnp.einsum("bhwc,co->bhwo", patches, kernel.reshape(k * k * c, -1))


class Conv(nnx.Module):
    """A k x k convolution with bias (see `conv2d`); init_scale 0 gives a zero-initialised conv."""

    def __init__(self, cin: int, cout: int, k: int = 3, *, stride: int = 1, impl: str = "im2col",
                 init_scale: float = 1.0, dtype=jnp.float32, rngs: nnx.Rngs):
        if impl not in CONV_IMPLS:
            raise ValueError(f"Unknown conv_impl {impl!r}; expected one of {CONV_IMPLS}")
        self.stride, self.impl, self.dtype = stride, impl, dtype
        if init_scale:
            init = nnx.initializers.variance_scaling(init_scale, "fan_in", "truncated_normal", in_axis=(0, 1, 2),
                                                     out_axis=3)
            kernel = init(rngs.params(), (k, k, cin, cout), jnp.float32)
        else:
            kernel = jnp.zeros((k, k, cin, cout), jnp.float32)
        self.kernel = sharding.param(kernel, ("conv_spatial", "conv_spatial", "conv_in", "conv_out"))
        self.bias = sharding.param(jnp.zeros((cout,), jnp.float32), ("conv_out",))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = conv2d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride, self.impl)
        return y + self.bias[...].astype(self.dtype)


class ResBlock(nnx.Module):
    """GN-SiLU-conv, GN with FiLM from emb, SiLU-conv (zero init), plus a 1x1 skip if C changes."""

    def __init__(self, cin: int, cout: int, emb_dim: int, *, groups: int, impl: str, dtype, rngs: nnx.Rngs):
        kw = dict(impl=impl, dtype=dtype, rngs=rngs)
        self.norm1 = GroupNorm(cin, groups)
        self.conv1 = Conv(cin, cout, 3, **kw)
        self.film = layers.Dense(emb_dim, 2 * cout, ("embed", "conv_out"), dtype=dtype, rngs=rngs)
        self.norm2 = GroupNorm(cout, groups)
        # Zero-initialised: every block starts as the identity, so a deep UNet trains from step 0.
        self.conv2 = Conv(cout, cout, 3, init_scale=0.0, **kw)
        self.skip = Conv(cin, cout, 1, **kw) if cin != cout else None

    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        scale, shift = jnp.split(self.film(jax.nn.silu(emb))[:, None, None, :], 2, axis=-1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(jax.nn.silu(h))
        return (x if self.skip is None else self.skip(x)) + h


class AttentionBlock(nnx.Module):
    """Over the H*W positions of a feature map: self-attention, cross-attention to the text, MLP."""

    def __init__(self, channels: int, head_dim: int, context_dim: int, *, self_attention: bool, mlp_ratio: int,
                 dtype, rngs: nnx.Rngs):
        heads = max(1, channels // head_dim)
        kw = dict(dtype=dtype)
        self.norm_self = layers.Norm(channels, **kw) if self_attention else None
        self.self_attn = layers.Attention(channels, heads, rngs=rngs, **kw) if self_attention else None
        self.norm_cross = layers.Norm(channels, **kw)
        self.cross_attn = layers.Attention(channels, heads, context_dim=context_dim, rngs=rngs, **kw)
        self.norm_mlp = layers.Norm(channels, **kw) if mlp_ratio else None
        self.mlp = layers.MLP(channels, mlp_ratio * channels, rngs=rngs, **kw) if mlp_ratio else None

    def __call__(self, x: jax.Array, context: jax.Array, context_mask: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        if self.self_attn is not None:
            tokens = tokens + self.self_attn(self.norm_self(tokens))
        tokens = tokens + self.cross_attn(self.norm_cross(tokens), context, mask=layers.key_mask(context_mask))
        if self.mlp is not None:
            tokens = tokens + self.mlp(self.norm_mlp(tokens))
        return tokens.reshape(b, h, w, c)


class Level(nnx.Module):
    """One resolution of the UNet on one side: ResBlocks, their attention blocks, a resampler."""

    def __init__(self, blocks: list, attns: list, resample: nnx.Module | None):
        self.blocks = nnx.List(blocks)
        self.attns = nnx.List(attns)  # empty, or one per ResBlock
        self.resample = resample


class Upsample(nnx.Module):
    """Nearest-neighbour x2 then a 3x3 conv: [B, H, W, C] -> [B, 2H, 2W, C]."""

    def __init__(self, channels: int, *, impl: str, dtype, rngs: nnx.Rngs):
        self.conv = Conv(channels, channels, 3, impl=impl, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class UNet(nnx.Module):
    """The text-conditioned UNet (see the module docstring)."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        if cfg.conv_impl not in CONV_IMPLS:
            raise ValueError(f"Unknown conv_impl {cfg.conv_impl!r}; expected one of {CONV_IMPLS}")
        n_levels = len(cfg.channel_mult)
        if cfg.image_size % 2 ** (n_levels - 1):
            raise ValueError(f"image_size {cfg.image_size} is not divisible by 2^{n_levels - 1} "
                             f"(one halving per level after the first)")
        dtype = layers.dtype_of(cfg.dtype)
        self.dtype, self.freq_dim = dtype, 64
        emb = 4 * cfg.base_channels
        kw = dict(impl=cfg.conv_impl, dtype=dtype, rngs=rngs)
        res_kw = dict(groups=cfg.groups, **kw)
        attn_kw = dict(mlp_ratio=cfg.attn_mlp_ratio, dtype=dtype, rngs=rngs)
        self.time_in = layers.Dense(self.freq_dim, emb, ("time", "embed"), dtype=dtype, rngs=rngs)
        self.time_out = layers.Dense(emb, emb, ("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.cond_proj = (layers.Dense(cfg.cond_dim, emb, (None, "embed"), dtype=dtype, rngs=rngs)
                          if cfg.cond_dim else None)
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = Conv(cfg.in_channels, chans[0], 3, **kw)

        def attn(c: int, size: int) -> list:
            if size not in cfg.attn_resolutions:
                return []
            return [AttentionBlock(c, cfg.head_dim, cfg.context_dim,
                                   self_attention=size in cfg.self_attn_resolutions, **attn_kw)]

        down, skips, c, size = [], [chans[0]], chans[0], cfg.image_size
        for i, out in enumerate(chans):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(c, out, emb, **res_kw))
                attns += attn(out, size)
                c = out
                skips.append(c)
            last = i == n_levels - 1
            down.append(Level(blocks, attns, None if last else Conv(c, c, 3, stride=2, **kw)))
            if not last:
                skips.append(c)
                size //= 2
        self.down = nnx.List(down)
        self.mid1 = ResBlock(c, c, emb, **res_kw)
        self.mid_attn = (AttentionBlock(c, cfg.head_dim, cfg.context_dim,
                                        self_attention=size in cfg.self_attn_resolutions, **attn_kw)
                         if cfg.mid_attention else None)
        self.mid2 = ResBlock(c, c, emb, **res_kw)
        up = []
        for i, out in reversed(list(enumerate(chans))):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(c + skips.pop(), out, emb, **res_kw))
                attns += attn(out, size)
                c = out
            first = i == 0
            up.append(Level(blocks, attns, None if first else Upsample(c, **kw)))
            if not first:
                size *= 2
        self.up = nnx.List(up)
        self.norm_out = GroupNorm(c, cfg.groups)
        self.conv_out = Conv(c, cfg.in_channels, 3, init_scale=0.0, **kw)

    def embed(self, t: jax.Array, cond: jax.Array | None) -> jax.Array:
        """The conditioning vector [B, E] from timesteps t [B] and the pooled text cond [B, Dp]."""
        emb = self.time_out(jax.nn.silu(self.time_in(timestep_embedding(t, self.freq_dim).astype(self.dtype))))
        if self.cond_proj is not None:
            if cond is None:
                raise ValueError("this UNet was built with cond_dim > 0 and needs a pooled cond vector")
            emb = emb + self.cond_proj(cond)
        return emb

    def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array, context_mask: jax.Array,
                 cond: jax.Array | None = None) -> jax.Array:
        """x [B, H, W, C], t [B], context [B, L, Dc], context_mask bool [B, L], cond [B, Dp]
        -> [B, H, W, C] in float32."""
        emb = self.embed(t, cond)
        h = sharding.constrain(self.conv_in(x.astype(self.dtype)), ("batch", "height", "width", None))
        hs = [h]
        for level in self.down:
            for j, block in enumerate(level.blocks):
                h = block(h, emb)
                if level.attns:
                    h = level.attns[j](h, context, context_mask)
                hs.append(h)
            if level.resample is not None:
                h = level.resample(h)
                hs.append(h)
        h = self.mid1(h, emb)
        if self.mid_attn is not None:
            h = self.mid_attn(h, context, context_mask)
        h = self.mid2(h, emb)
        for level in self.up:
            for j, block in enumerate(level.blocks):
                h = block(jnp.concatenate([h, hs.pop()], axis=-1), emb)
                if level.attns:
                    h = level.attns[j](h, context, context_mask)
            if level.resample is not None:
                h = level.resample(h)
        h = self.conv_out(jax.nn.silu(self.norm_out(h)))
        return h.astype(jnp.float32)


def create(cfg: ml_collections.ConfigDict | None = None, *, rngs: nnx.Rngs | None = None) -> UNet:
    """The UNet of config `cfg` (default: the S variant), seeded by `rngs` (default seed 0)."""
    return UNet(config() if cfg is None else cfg, rngs=rngs or nnx.Rngs(0))
