"""The KL autoencoder of latent diffusion (Stable Diffusion's VAE, diffusers `AutoencoderKL` layout).

    images [B, H, W, 3] in [-1, 1]  --encode-->  mean, logvar [B, H/f, W/f, Cz]
    latents z [B, H/f, W/f, Cz]     --decode-->  images [B, H, W, 3]

    encoder: conv_in -> per block: ResBlocks, then a stride-2 conv (all but the last block)
             -> mid: ResBlock, single-head self-attention, ResBlock -> GroupNorm, SiLU,
             conv_out to 2*Cz -> quant_conv (1x1, optional) -> split into mean and logvar
    decoder: post_quant_conv (1x1, optional) -> conv_in -> mid -> per block, channels reversed:
             layers_per_block + 1 ResBlocks, then nearest x2 + conv (all but the last block)
             -> GroupNorm, SiLU, conv_out to 3

f = 2^(len(block_out_channels) - 1) is the downsample factor. A diffusion model works on the
scaled latents `(z - shift_factor) * scaling_factor`, which have roughly unit variance
(`latents` / `images_from_latents`). The layer sizes, normalisation epsilons (1e-6), the
asymmetric padding of the stride-2 conv and the logvar clamp follow diffusers, so weights
imported by `dalle3_jax.weights.vae` reproduce its outputs; the module names are this project's
(the importer translates them).

Dimension letters: B batch, H/W image height/width, C channels, Cz latent channels, f the
downsample factor.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dalle3_jax import models, sharding
from dalle3_jax.models import layers, unet

# tiny: tests and the synthetic world at 128 px (-> 32 x 32 latents). sd: the Stable Diffusion
# 1.x/2.x VAE (and SDXL's, whose config differs only in scaling_factor 0.13025).
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                 image_size=128),
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
               latent_channels=4, image_size=512),
}
EPS = 1e-6  # every GroupNorm of the diffusers VAE
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers clamps the posterior's log-variance to this range


def config(variant: str = "tiny", **overrides: Any) -> ml_collections.ConfigDict:
    """The autoencoder config for `variant`; KeyError for an unknown variant or field."""
    c = ml_collections.ConfigDict()
    c.model = "autoencoder_kl"  # registry name (dalle3_jax.models.get)
    c.variant = variant  # the row of VARIANTS the sizes came from
    c.image_size = 128  # side the autoencoder was made for (any side divisible by f works)
    c.in_channels = 3  # image channels read by the encoder
    c.out_channels = 3  # image channels written by the decoder
    c.block_out_channels = (32, 64, 64)  # channels per block; each block after the first halves H, W
    c.layers_per_block = 1  # ResBlocks per encoder block (the decoder has one more per block)
    c.norm_num_groups = 8  # GroupNorm groups (must divide every channel count)
    c.latent_channels = 4  # Cz
    c.mid_attention = True  # self-attention between the two middle ResBlocks (diffusers' mid_block_add_attention)
    c.use_quant_conv = True  # 1x1 conv on the encoder's moments (absent in some checkpoints)
    c.use_post_quant_conv = True  # 1x1 conv on the latents before the decoder
    c.scaling_factor = 0.18215  # latents fed to diffusion = (z - shift) * scale; SD 1.x/2.x 0.18215, SDXL 0.13025
    c.shift_factor = 0.0  # see scaling_factor (diffusers' null = 0)
    c.dtype = "float32"  # compute dtype ("bfloat16" on accelerators; norms and softmax stay float32)
    return models.finish_config(c, VARIANTS, variant, overrides, "AutoencoderKL")


class GroupNorm(unet.GroupNorm):
    """GroupNorm over [B, H, W, C] with the mean removed before the variance is taken.

    The UNet's version uses E[x^2] - E[x]^2, exact for its O(1) activations; a pretrained VAE
    decoder carries activations in the hundreds, where that difference cancels catastrophically
    in float32. Same parameters (scale, bias), so the two are interchangeable in a checkpoint.
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        xg = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class ResBlock(nnx.Module):
    """GroupNorm, SiLU, conv3x3, GroupNorm, SiLU, conv3x3, plus the input (1x1 conv if C changes)."""

    def __init__(self, cin: int, cout: int, *, groups: int, dtype, rngs: nnx.Rngs):
        kw = dict(impl="xla", dtype=dtype, rngs=rngs)
        self.norm1 = GroupNorm(cin, groups, EPS)
        self.conv1 = unet.Conv(cin, cout, 3, **kw)
        self.norm2 = GroupNorm(cout, groups, EPS)
        self.conv2 = unet.Conv(cout, cout, 3, **kw)
        self.skip = unet.Conv(cin, cout, 1, **kw) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.skip is None else self.skip(x)) + h


class AttentionBlock(nnx.Module):
    """x + single-head self-attention over the H*W positions of GroupNorm(x); logits scaled 1/sqrt(C)."""

    def __init__(self, channels: int, *, groups: int, dtype, rngs: nnx.Rngs):
        self.norm = GroupNorm(channels, groups, EPS)
        self.attention = layers.Attention(channels, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.norm(x).reshape(b, h * w, c)
        return x + self.attention(tokens).reshape(b, h, w, c).astype(x.dtype)


class Downsample(nnx.Module):
    """[B, H, W, C] -> [B, H/2, W/2, C]: a stride-2 3x3 conv after padding only the bottom row and
    right column by one (the VAE's convention; a centred pad would shift every latent by a pixel)."""

    def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
        self.conv = unet.Conv(channels, channels, 3, impl="xla", dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        conv = self.conv
        y = jax.lax.conv_general_dilated(x.astype(conv.dtype), conv.kernel[...].astype(conv.dtype), (2, 2),
                                         [(0, 1), (0, 1)], dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + conv.bias[...].astype(conv.dtype)


class Block(nnx.Module):
    """One resolution of the encoder or decoder: ResBlocks, then an optional resampler."""

    def __init__(self, resnets: list[ResBlock], resample: nnx.Module | None):
        self.resnets = nnx.List(resnets)
        self.resample = resample

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.resnets:
            x = block(x)
        return x if self.resample is None else self.resample(x)


class Mid(nnx.Module):
    """ResBlock, optional self-attention, ResBlock at the smallest resolution."""

    def __init__(self, channels: int, *, attention: bool, groups: int, dtype, rngs: nnx.Rngs):
        kw = dict(groups=groups, dtype=dtype, rngs=rngs)
        self.block1 = ResBlock(channels, channels, **kw)
        self.attn = AttentionBlock(channels, **kw) if attention else None
        self.block2 = ResBlock(channels, channels, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.block1(x)
        if self.attn is not None:
            x = self.attn(x)
        return self.block2(x)


class Encoder(nnx.Module):
    """[B, H, W, Cin] -> [B, H/f, W/f, 2*Cz] (the posterior's mean and logvar, concatenated)."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, dtype, rngs: nnx.Rngs):
        chans, groups = list(cfg.block_out_channels), cfg.norm_num_groups
        kw = dict(dtype=dtype, rngs=rngs)
        self.conv_in = unet.Conv(cfg.in_channels, chans[0], 3, impl="xla", **kw)
        blocks, c = [], chans[0]
        for i, out in enumerate(chans):
            resnets = []
            for _ in range(cfg.layers_per_block):
                resnets.append(ResBlock(c, out, groups=groups, **kw))
                c = out
            blocks.append(Block(resnets, Downsample(c, **kw) if i < len(chans) - 1 else None))
        self.down_blocks = nnx.List(blocks)
        self.mid = Mid(c, attention=cfg.mid_attention, groups=groups, **kw)
        self.norm_out = GroupNorm(c, groups, EPS)
        self.conv_out = unet.Conv(c, 2 * cfg.latent_channels, 3, impl="xla", **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = sharding.constrain(self.conv_in(x), ("batch", "height", "width", None))
        for block in self.down_blocks:
            h = block(h)
        h = self.mid(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class Decoder(nnx.Module):
    """[B, h, w, Cz] -> [B, h*f, w*f, Cout]."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, dtype, rngs: nnx.Rngs):
        chans, groups = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        kw = dict(dtype=dtype, rngs=rngs)
        self.conv_in = unet.Conv(cfg.latent_channels, chans[0], 3, impl="xla", **kw)
        self.mid = Mid(chans[0], attention=cfg.mid_attention, groups=groups, **kw)
        blocks, c = [], chans[0]
        for i, out in enumerate(chans):
            resnets = []
            for _ in range(cfg.layers_per_block + 1):
                resnets.append(ResBlock(c, out, groups=groups, **kw))
                c = out
            up = unet.Upsample(c, impl="xla", dtype=dtype, rngs=rngs) if i < len(chans) - 1 else None
            blocks.append(Block(resnets, up))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = GroupNorm(c, groups, EPS)
        self.conv_out = unet.Conv(c, cfg.out_channels, 3, impl="xla", **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = sharding.constrain(self.conv_in(z), ("batch", "height", "width", None))
        h = self.mid(h)
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class AutoencoderKL(nnx.Module):
    """The KL-regularised autoencoder (see the module docstring)."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        chans = tuple(cfg.block_out_channels)
        bad = [c for c in chans if c % cfg.norm_num_groups]
        if not chans or bad:
            raise ValueError(f"block_out_channels {chans} must be non-empty and divisible by norm_num_groups "
                             f"{cfg.norm_num_groups}")
        dtype = layers.dtype_of(cfg.dtype)
        self.dtype = dtype
        self.in_channels = int(cfg.in_channels)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample_factor = 2 ** (len(chans) - 1)
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(cfg.shift_factor or 0.0)
        kw = dict(impl="xla", dtype=dtype, rngs=rngs)
        cz = self.latent_channels
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
        self.quant_conv = unet.Conv(2 * cz, 2 * cz, 1, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = unet.Conv(cz, cz, 1, **kw) if cfg.use_post_quant_conv else None
        self.decoder = Decoder(cfg, dtype=dtype, rngs=rngs)

    def _check(self, x: jax.Array, channels: int, what: str, side_multiple: int) -> None:
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"{what} must be [B, H, W, {channels}] (NHWC), got shape {tuple(x.shape)}")
        if x.shape[1] % side_multiple or x.shape[2] % side_multiple:
            raise ValueError(f"{what} sides {x.shape[1:3]} must be divisible by {side_multiple}")

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B, H, W, Cin] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, Cz] float32."""
        self._check(images, self.in_channels, "images", self.downsample_factor)
        moments = self.encoder(images.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents z [B, h, w, Cz] -> images [B, h*f, w*f, Cout] float32 (about [-1, 1])."""
        self._check(latents, self.latent_channels, "latents", 1)
        z = latents.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstruction of images [B, H, W, Cin] through the posterior mean."""
        return self.decode(self.encode(images)[0])

    def latents(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Scaled latents for diffusion: (z - shift) * scale, z the posterior mean (rng None) or a
        sample mean + exp(logvar / 2) * noise drawn with `rng`. [B, H, W, Cin] -> [B, H/f, W/f, Cz]."""
        mean, logvar = self.encode(images)
        z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        return (z - self.shift_factor) * self.scaling_factor

    def images_from_latents(self, latents: jax.Array) -> jax.Array:
        """The inverse of `latents` then `decode`: scaled latents [B, h, w, Cz] -> images [B, h*f, w*f, Cout]."""
        return self.decode(latents / self.scaling_factor + self.shift_factor)


def create(cfg: ml_collections.ConfigDict | None = None, *, rngs: nnx.Rngs | None = None) -> AutoencoderKL:
    """The autoencoder of config `cfg` (default: the tiny variant), seeded by `rngs` (default seed 0)."""
    return AutoencoderKL(config() if cfg is None else cfg, rngs=rngs or nnx.Rngs(0))
