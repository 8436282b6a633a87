"""Vision Transformer image encoder: images [B, H, W, C] -> patch tokens [B, N, D].

N = (H / P) * (W / P) for patch size P, D the encoder width. The encoder returns every patch
token (no class token): CoCa pools them with learned queries, which reads all patches rather
than one summary slot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dalle3_jax import sharding
from dalle3_jax.models import layers


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """[B, H, W, C] -> [B, N, P*P*C], patches in row-major order, each flattened (row, col, C).

    A reshape and one matmul (in `PatchEmbed`) is exactly a stride-P convolution, but runs as a
    single large GEMM, which CPUs and accelerators both execute far faster than a strided conv.
    """
    b, h, w, c = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {patch}")
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def sincos_2d(grid_h: int, grid_w: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2D sine-cosine position table [grid_h * grid_w, dim].

    A quarter of the channels each encode sin(y), cos(y), sin(x), cos(x) at geometrically spaced
    frequencies, so nearby patches get similar codes in both directions and the table needs no
    training (useful when fine-tuning at another resolution: it can simply be recomputed).
    """
    if dim % 4:
        raise ValueError(f"sincos 2D positions need a width divisible by 4, got {dim}")
    y, x = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")
    omega = 1.0 / temperature ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
    ang_y = y.reshape(-1, 1) * omega[None]
    ang_x = x.reshape(-1, 1) * omega[None]
    return np.concatenate([np.sin(ang_y), np.cos(ang_y), np.sin(ang_x), np.cos(ang_x)], axis=1).astype(np.float32)


class ConvStem(nnx.Module):
    """3x3 stride-2 convolutions (GELU between): images [B, H, W, C] -> [B, H/2^k, W/2^k, C_k].

    A few early convolutions let a small ViT see shapes that straddle patch borders (Xiao et al.,
    2021, "Early convolutions help transformers see better"); at these channel counts they cost
    a small fraction of the transformer's FLOPs.
    """

    def __init__(self, channels_in: int, channels: tuple[int, ...], *, dtype, param_dtype, rngs: nnx.Rngs):
        init = sharding.logical(nnx.initializers.lecun_normal(), ("conv_spatial", "conv_spatial", "conv_in", "conv_out"))
        dims = (channels_in, *channels)
        self.convs = nnx.List([
            nnx.Conv(a, b, kernel_size=(3, 3), strides=(2, 2), padding="SAME", kernel_init=init,
                     bias_init=sharding.logical(nnx.initializers.zeros_init(), ("conv_out",)),
                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for a, b in zip(dims[:-1], dims[1:])
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv in self.convs:
            x = jax.nn.gelu(conv(x))
        return x


class ViT(nnx.Module):
    """Patch embedding + positions + pre-norm transformer blocks + final norm.

    images [B, H, W, C] (H = W = image_size) -> tokens [B, N, D].
    """

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        channels: int = 3,
        stem_channels: tuple[int, ...] = (),
        pos_embed: str = "learned",
        norm: str = "layernorm",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        self.grid = image_size // patch_size
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        # An optional conv stem downsamples by 2 per conv; the patches then cover the same pixels.
        stem_channels = tuple(stem_channels)
        factor = 2 ** len(stem_channels)
        if patch_size % factor:
            raise ValueError(f"patch_size {patch_size} is not divisible by the conv stem's stride {factor}")
        self.stem = ConvStem(channels, stem_channels, rngs=rngs, **kw) if stem_channels else None
        self.token_patch = patch_size // factor
        patch_dim = self.token_patch**2 * (stem_channels[-1] if stem_channels else channels)
        # The flattened patch dim is small and indexed by pixel layout: keep it whole.
        self.patch_embed = layers.Dense(patch_dim, width, (None, "embed"), rngs=rngs, **kw)
        n = self.grid * self.grid
        if pos_embed == "learned":
            table = 0.02 * jax.random.normal(rngs.params(), (n, width), param_dtype)
            self.pos = sharding.param(table, ("pos", "embed"))
        elif pos_embed == "sincos":
            # A constant, not a parameter: recomputed from the shape, so it is never trained or
            # checkpointed.
            self.pos = None
        else:
            raise ValueError(f"Unknown pos_embed {pos_embed!r}; expected 'learned' or 'sincos'.")
        self.pos_kind, self.width = pos_embed, width
        self.blocks = nnx.List(
            [layers.Block(width, heads, mlp_dim, norm=norm, rngs=rngs, **kw) for _ in range(depth)]
        )
        self.norm = layers.Norm(width, norm, **kw)

    def positions(self) -> jax.Array:
        """[N, D] position table (learned or fixed)."""
        if self.pos is None:
            return jnp.asarray(sincos_2d(self.grid, self.grid, self.width))
        return self.pos[...]

    def __call__(self, images: jax.Array) -> jax.Array:
        want = (self.image_size, self.image_size, self.channels)
        if tuple(images.shape[1:]) != want:
            raise ValueError(f"ViT expects images [B, {want[0]}, {want[1]}, {want[2]}], got {tuple(images.shape)}")
        x = images.astype(self.dtype)
        if self.stem is not None:
            x = self.stem(x)
        x = self.patch_embed(patchify(x, self.token_patch))
        x = x + self.positions().astype(self.dtype)[None]
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        for block in self.blocks:
            x = block(x)  # no mask: every patch sees every patch
        return self.norm(x)
