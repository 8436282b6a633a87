"""The text-to-image denoiser: a text encoder, a bag of token embeddings and the UNet.

    tokens [B, L] --text encoder--> TextEncoding(states [B, L, D], mask [B, L], pooled [B, D])
        pooled += sum over real tokens of a learned per-token embedding   (the "token bag")
    UNet(x [B, H, W, C], t [B], context = states, context_mask = mask, cond = pooled) -> [B, H, W, C]

The token bag gives every ResBlock's scale-and-shift direct access to each word of the caption
("red", "small", "left") without going through attention: on the shapes world this was, with
the pooled state, what made colour, shape, size and place learnable within minutes on a CPU.

Text is encoded once per caption and reused at every sampling step (`encode_text`, then
`denoise`); `__call__` does both, for training.

With `text_pretrained` set to a Hugging Face T5 checkpoint directory, the text encoder has that
checkpoint's architecture and vocabulary (dalle3_jax/weights/t5.py; the `text` block and
vocab_size are then unused) and is frozen: no gradient flows into it, and the T2I trainer
fills its weights at a fresh start and excludes them from the optimizer (optim.frozen).

    cfg = t2i.config("S", vocab_size=1024)
    model = t2i.create(cfg, rngs=nnx.Rngs(0))
    out = model(x, t, tokens)            # [B, H, W, C]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dalle3_jax import sharding
from dalle3_jax.models import t5, text, unet

TEXT_ENCODERS = ("t5",)
VARIANTS: dict[str, dict[str, str]] = {"tiny": dict(text="tiny", unet="tiny"), "S": dict(text="S", unet="S"),
                                       "B": dict(text="B", unet="B")}


def config(variant: str = "S", **overrides: Any) -> ml_collections.ConfigDict:
    """The T2I model config: `text` and `unet` blocks of `variant`, plus the fields below.

    `overrides` may set top-level fields (vocab_size, token_bag, text_encoder); the blocks are
    edited as `cfg.unet.base_channels = ...`. The UNet's context and cond widths follow the text
    encoder's width (cond_dim = 0 keeps the pooled text out), and the encoder's vocabulary is
    the top-level vocab_size.
    """
    if variant not in VARIANTS:
        raise KeyError(f"Unknown T2I variant {variant!r}; known: {sorted(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.model = "t2i"  # registry name (dalle3_jax.models.get)
    c.variant = variant  # the row of VARIANTS the blocks came from
    c.text_encoder = "t5"  # which encoder fills the TextEncoding interface (see models/t5.py)
    c.vocab_size = 1024  # V, >= the tokenizer's vocabulary (token bag and encoder embeddings)
    c.token_bag = True  # add the sum of learned per-token embeddings to the pooled text vector
    # Standard deviation of the token bag's initial embeddings. Larger values make each word felt
    # in every ResBlock from the first steps (in the encoder's pooled mean a place word is one
    # token of ~20); on high-noise-only training of the S model, 0.5 let captions place objects
    # after ~400 steps at batch 32 where 0.02 had not after 1,000.
    c.token_bag_init = 0.02
    c.text_pretrained = ""  # an HF T5 checkpoint directory: its frozen encoder replaces the scratch one
    c.text = t5.config(VARIANTS[variant]["text"])  # the text encoder's architecture
    c.unet = unet.config(VARIANTS[variant]["unet"])  # the denoiser's architecture
    for key, value in overrides.items():
        if key not in c or key in ("text", "unet"):
            raise KeyError(f"Unknown T2I config field {key!r} (edit the text/unet blocks directly); "
                           f"fields: {sorted(k for k in c.keys() if k not in ('text', 'unet'))}")
        c[key] = value
    return c


def text_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The text encoder's config: the `text` block with the top-level vocab_size or, with
    `text_pretrained`, the architecture (vocabulary and special ids included) of that checkpoint."""
    if cfg.get("text_pretrained"):
        from dalle3_jax.weights import t5 as t5_weights  # reads the checkpoint's config.json

        return t5_weights.encoder_config(cfg.text_pretrained, dtype=cfg.text.dtype)
    text_cfg = ml_collections.ConfigDict(cfg.text.to_dict())
    text_cfg.vocab_size = cfg.vocab_size
    return text_cfg


class TextToImage(nnx.Module):
    """Text encoder + token bag + UNet (see the module docstring)."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        if cfg.text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"Unknown text_encoder {cfg.text_encoder!r}; expected one of {TEXT_ENCODERS}")
        text_cfg = text_config(cfg)
        self.text = t5.create(text_cfg, rngs=rngs)
        self.text_frozen = bool(cfg.get("text_pretrained"))
        width = self.text.width
        self.pad_id, self.eos_id = text_cfg.pad_id, text_cfg.eos_id
        self.token_bag = (sharding.param(cfg.get("token_bag_init", 0.02)
                                         * jax.random.normal(rngs.params(), (text_cfg.vocab_size, width)),
                                         ("vocab", "embed")) if cfg.token_bag else None)
        unet_cfg = ml_collections.ConfigDict(cfg.unet.to_dict())
        unet_cfg.context_dim = width
        unet_cfg.cond_dim = width if unet_cfg.cond_dim else 0  # cond_dim = 0 turns the pooled text off
        self.unet = unet.create(unet_cfg, rngs=rngs)
        self.image_size, self.channels = unet_cfg.image_size, unet_cfg.in_channels

    def encode_text(self, tokens: jax.Array, cached: t5.TextEncoding | None = None) -> t5.TextEncoding:
        """tokens [B, L] -> TextEncoding whose pooled vector includes the token bag.

        cached: the frozen encoder's own output for these tokens, computed ahead of training
        (diffusion/text_cache.py); the encoder is then not run, the token bag still is."""
        if cached is not None and not self.text_frozen:
            raise ValueError("cached text states need a frozen (pretrained) text encoder")
        enc = self.text(tokens) if cached is None else cached
        if self.text_frozen:  # no backward pass through a frozen encoder
            enc = jax.lax.stop_gradient(enc)
        if self.token_bag is None:
            return enc
        valid = text.token_mask(tokens, self.pad_id, self.eos_id)
        table = sharding.constrain(self.token_bag[...], (None, None))  # whole table for the gather
        bag = jnp.sum(jnp.take(table, tokens, axis=0) * valid[..., None], axis=1)
        return t5.TextEncoding(states=enc.states, mask=enc.mask, pooled=enc.pooled + bag.astype(enc.pooled.dtype))

    def denoise(self, x: jax.Array, t: jax.Array, enc: t5.TextEncoding) -> jax.Array:
        """x [B, H, W, C], t [B], an encoded caption -> the UNet's prediction [B, H, W, C]."""
        return self.unet(x, t, enc.states, enc.mask, enc.pooled)

    def __call__(self, x: jax.Array, t: jax.Array, tokens: jax.Array) -> jax.Array:
        return self.denoise(x, t, self.encode_text(tokens))


def create(cfg: ml_collections.ConfigDict | None = None, *, rngs: nnx.Rngs | None = None) -> TextToImage:
    """The T2I model of config `cfg` (default: S), seeded by `rngs` (default seed 0)."""
    return TextToImage(config() if cfg is None else cfg, rngs=rngs or nnx.Rngs(0))
