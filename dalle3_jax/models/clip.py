"""CLIP (Radford et al., 2021) in the Hugging Face `CLIPModel` layout, for pretrained weights.

    images [B, H, W, 3] (CLIP-normalised) --patches + class token + positions--> pre-LN
        --pre-norm blocks--> tokens [B, 1+N, Dv] --post-LN(class token)--> visual projection -> [B, E]
    tokens [B, L] --token + position embeddings--> causal pre-norm blocks --final LN-->
        hidden at the end-of-text token --> text projection -> [B, E]
    logits = exp(logit_scale) * cos(image, text)

The math is HF's `CLIPModel` (transformers/models/clip/modeling_clip.py) exactly, so
`dalle3_jax.weights.clip.load_clip` can import a checkpoint and reproduce its embeddings to
float32 rounding; the model also trains from scratch like any other registered model.

Input space: `images` are what `CLIPImageProcessor` hands the PyTorch model, channels last:
pixels in [0, 1] normalised per channel with `config.image_mean` / `config.image_std`
(`normalize_images` does that from [0, 1]; `from_unit_range` from the project's [-1, 1]).

Outputs:
    encode_images(images)  -> [B, E] projected image embeddings, *unnormalised* (HF's
                              `get_image_features`); normalize=True gives unit vectors
    encode_texts(tokens)   -> [B, E] projected text embeddings, unnormalised (HF's
                              `get_text_features`); normalize=True gives unit vectors
    patch_tokens(images)   -> [B, N, Dv] the vision tower's patch tokens (last hidden state
                              without the class token, before the post-layernorm, as HF's
                              `last_hidden_state[:, 1:]`)
    encode_image / encode_text: unit embeddings with CoCa's interface, so the evaluation CLIP
                              (`evals.clip_score.ClipScorer`) takes either model

Pooling of the text tower follows HF: the hidden state at the first `eos_id` token, or, when
eos_id == 2 (configs written before transformers PR #24773), at the highest token id
(`argmax(tokens)`), which is where the end-of-text token sits in OpenAI's vocabulary.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dalle3_jax import models, sharding
from dalle3_jax.models import layers, vit

# OpenAI CLIP's image normalisation (CLIPImageProcessor's defaults).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Architecture per variant. tiny: tests; B-32 / B-16 / L-14: OpenAI's released shapes (so a
# config built here matches their checkpoints; `weights.clip.load_clip` reads config.json anyway).
_TEXT_B = dict(vocab_size=49408, max_text_len=77, text_width=512, text_layers=12, text_heads=8, text_mlp_dim=2048,
               eos_id=49407, bos_id=49406, pad_id=49407)
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=4, vision_mlp_dim=64,
                 vocab_size=128, max_text_len=16, text_width=32, text_layers=2, text_heads=4, text_mlp_dim=64,
                 embed_dim=24, eos_id=2, bos_id=1, pad_id=0),
    "B-32": dict(image_size=224, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12,
                 vision_mlp_dim=3072, embed_dim=512, **_TEXT_B),
    "B-16": dict(image_size=224, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
                 vision_mlp_dim=3072, embed_dim=512, **_TEXT_B),
    "L-14": dict(image_size=224, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
                 vision_mlp_dim=4096, embed_dim=768,
                 **{**_TEXT_B, "text_width": 768, "text_heads": 12, "text_mlp_dim": 3072}),
}

TOWERS = ("both", "vision", "text")
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


def config(variant: str = "tiny", **overrides: Any) -> ml_collections.ConfigDict:
    """The CLIP config for `variant` ("tiny", "B-32", "B-16", "L-14"), with `overrides`."""
    c = ml_collections.ConfigDict()
    c.model = "clip"  # registry name
    c.variant = variant  # the row of VARIANTS the architecture came from
    c.towers = "both"  # "both" (CLIPModel), "vision" or "text" (a one-tower checkpoint)
    c.projection = True  # project pooled outputs to embed_dim (False: CLIPVisionModel / CLIPTextModel,
    # whose embeddings are the pooled outputs themselves, embed_dim = the tower's width)
    # --- vision tower ---
    c.image_size = 224  # input images are image_size x image_size x channels
    c.patch_size = 32  # patch side; N = (image_size / patch_size)^2 patch tokens (+1 class token)
    c.channels = 3
    c.vision_width = 768  # Dv
    c.vision_layers = 12
    c.vision_heads = 12
    c.vision_mlp_dim = 3072
    c.vision_act = "quick_gelu"  # MLP activation: quick_gelu (OpenAI) | gelu (exact erf) | gelu_new | relu
    c.vision_eps = 1e-5  # layer-norm epsilon of every vision norm
    c.image_mean = OPENAI_MEAN  # per-channel normalisation of the input (see normalize_images)
    c.image_std = OPENAI_STD
    # --- text tower ---
    c.vocab_size = 49408
    c.max_text_len = 77  # position table length (the longest token sequence)
    c.text_width = 512  # Dt
    c.text_layers = 12
    c.text_heads = 8
    c.text_mlp_dim = 2048
    c.text_act = "quick_gelu"
    c.text_eps = 1e-5
    c.eos_id = 49407  # end-of-text id: the text embedding is read there (2 = HF's legacy argmax rule)
    c.bos_id = 49406  # start-of-text id (for tokenisers; the model does not read it)
    c.pad_id = 49407  # padding id (OpenAI pads with end-of-text; causal attention makes it harmless)
    # --- joint space ---
    c.embed_dim = 512  # E, projection width
    c.logit_scale_init = math.log(1 / 0.07)  # learned log temperature^-1 at init (HF's 2.6592)
    # --- numerics ---
    c.dtype = "float32"  # compute dtype (norms and softmax stay float32)
    c.param_dtype = "float32"
    return models.finish_config(c, VARIANTS, variant, overrides, "CLIP")


def activation(name: str):
    """HF's ACT2FN for the activations CLIP checkpoints use."""
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"Unknown CLIP activation {name!r}; expected one of {ACTIVATIONS}")


class ClipMLP(nnx.Module):
    """fc1 -> activation -> fc2 (HF CLIPMLP), with the configured activation."""

    def __init__(self, dim: int, hidden: int, act: str, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = layers.Dense(dim, hidden, ("embed", "mlp"), **kw)
        self.fc2 = layers.Dense(hidden, dim, ("mlp", "embed"), **kw)
        self.act_name = act
        activation(act)  # validates the name at construction

    def __call__(self, x: jax.Array) -> jax.Array:
        h = activation(self.act_name)(self.fc1(x))
        h = sharding.constrain(h, ("batch", "length", "act_mlp"))
        return self.fc2(h)


class ClipBlock(nnx.Module):
    """HF CLIPEncoderLayer: x + attn(LN1(x)), then + MLP(LN2(x)). Attention is
    `layers.Attention` (q/k/v/out with biases, 1/sqrt(head_dim) scale) and the norms are
    `layers.Norm` with the checkpoint's epsilon; only the MLP activation is CLIP's own."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, act: str, eps: float, *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm_attn = layers.Norm(dim, eps=eps, **kw)
        self.attn = layers.Attention(dim, heads, rngs=rngs, **kw)
        self.norm_mlp = layers.Norm(dim, eps=eps, **kw)
        self.mlp = ClipMLP(dim, mlp_dim, act, rngs=rngs, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = x + self.attn(self.norm_attn(x), mask=mask)
        x = x + self.mlp(self.norm_mlp(x))
        return sharding.constrain(x, ("batch", "length", "act_embed"))


class VisionTower(nnx.Module):
    """HF CLIPVisionTransformer: images [B, H, W, C] -> (tokens [B, 1+N, Dv], pooled [B, Dv])."""

    def __init__(self, c: ml_collections.ConfigDict, *, dtype, param_dtype, rngs: nnx.Rngs):
        if c.image_size % c.patch_size:
            raise ValueError(f"image_size {c.image_size} is not divisible by patch_size {c.patch_size}")
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        d = c.vision_width
        self.image_size, self.patch_size, self.channels = c.image_size, c.patch_size, c.channels
        self.grid = c.image_size // c.patch_size
        self.dtype = dtype
        # The stride-P conv (no bias) as one matmul over flattened patches (see vit.patchify).
        self.patch_embed = layers.Dense(c.patch_size**2 * c.channels, d, (None, "embed"), use_bias=False,
                                        rngs=rngs, **kw)
        self.class_embed = sharding.param(jax.random.normal(rngs.params(), (d,), param_dtype) * d**-0.5, ("embed",))
        self.pos = sharding.param(0.02 * jax.random.normal(rngs.params(), (self.grid**2 + 1, d), param_dtype),
                                  ("pos", "embed"))
        self.pre_norm = layers.Norm(d, eps=c.vision_eps, **kw)
        self.blocks = nnx.List([ClipBlock(d, c.vision_heads, c.vision_mlp_dim, c.vision_act, c.vision_eps,
                                          rngs=rngs, **kw) for _ in range(c.vision_layers)])
        self.post_norm = layers.Norm(d, eps=c.vision_eps, **kw)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        want = (self.image_size, self.image_size, self.channels)
        if tuple(images.shape[1:]) != want:
            raise ValueError(f"CLIP expects images [B, {want[0]}, {want[1]}, {want[2]}], got {tuple(images.shape)}")
        x = self.patch_embed(vit.patchify(images.astype(self.dtype), self.patch_size))
        cls = jnp.broadcast_to(self.class_embed[...].astype(self.dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos[...].astype(self.dtype)[None]
        x = sharding.constrain(self.pre_norm(x), ("batch", "length", "act_embed"))
        for block in self.blocks:
            x = block(x)
        return x, self.post_norm(x[:, 0])


class TextTower(nnx.Module):
    """HF CLIPTextTransformer: tokens [B, L] -> (hidden [B, L, Dt] after the final LN, pooled [B, Dt])."""

    def __init__(self, c: ml_collections.ConfigDict, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        d = c.text_width
        self.token_embed = sharding.param(0.02 * jax.random.normal(rngs.params(), (c.vocab_size, d), param_dtype),
                                          ("vocab", "embed"))
        self.pos = sharding.param(0.01 * jax.random.normal(rngs.params(), (c.max_text_len, d), param_dtype),
                                  ("pos", "embed"))
        self.blocks = nnx.List([ClipBlock(d, c.text_heads, c.text_mlp_dim, c.text_act, c.text_eps,
                                          rngs=rngs, **kw) for _ in range(c.text_layers)])
        self.final_norm = layers.Norm(d, eps=c.text_eps, **kw)
        self.eos_id, self.max_len, self.dtype = int(c.eos_id), int(c.max_text_len), dtype

    def eos_positions(self, tokens: jax.Array) -> jax.Array:
        """[B] index the text embedding is read at (HF's rule, see the module docstring)."""
        if self.eos_id == 2:
            return jnp.argmax(tokens, axis=-1)
        return jnp.argmax((tokens == self.eos_id).astype(jnp.int32), axis=-1)

    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"{length} tokens exceed the CLIP text position table ({self.max_len})")
        x = jnp.take(self.token_embed[...], tokens, axis=0).astype(self.dtype)
        x = x + self.pos[...][:length].astype(self.dtype)[None]
        mask = layers.causal_mask(length)
        for block in self.blocks:
            x = block(x, mask)
        x = self.final_norm(x)
        pooled = jnp.take_along_axis(x, self.eos_positions(tokens)[:, None, None], axis=1)[:, 0]
        return x, pooled


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps))


class CLIP(nnx.Module):
    """CLIP with HF's CLIPModel math (see the module docstring); one tower for one-tower configs."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.config = ml_collections.FrozenConfigDict(cfg)
        c = self.config
        if c.towers not in TOWERS:
            raise ValueError(f"Unknown CLIP towers {c.towers!r}; expected one of {TOWERS}")
        kw = dict(dtype=layers.dtype_of(c.dtype), param_dtype=layers.dtype_of(c.param_dtype))
        dense = dict(use_bias=False, rngs=rngs, **kw)
        vision, text, proj = c.towers in ("both", "vision"), c.towers in ("both", "text"), bool(c.projection)
        self.vision = VisionTower(c, rngs=rngs, **kw) if vision else None
        self.visual_proj = layers.Dense(c.vision_width, c.embed_dim, ("embed", None), **dense) if vision and proj else None
        self.text = TextTower(c, rngs=rngs, **kw) if text else None
        self.text_proj = layers.Dense(c.text_width, c.embed_dim, ("embed", None), **dense) if text and proj else None
        self.logit_scale = (sharding.param(jnp.asarray(c.logit_scale_init, kw["param_dtype"]), ())
                            if c.towers == "both" else None)

    # -- inputs -----------------------------------------------------------------------------------

    def normalize_images(self, images01: jax.Array) -> jax.Array:
        """[B, H, W, C] pixels in [0, 1] -> the model's input space (mean/std per channel)."""
        mean = jnp.asarray(self.config.image_mean, jnp.float32)
        std = jnp.asarray(self.config.image_std, jnp.float32)
        return (images01.astype(jnp.float32) - mean) / std

    def from_unit_range(self, images: jax.Array) -> jax.Array:
        """The project's model images (float in [-1, 1]) -> the model's input space."""
        return self.normalize_images((images.astype(jnp.float32) + 1.0) * 0.5)

    # -- towers -----------------------------------------------------------------------------------

    def _need(self, tower: str) -> None:
        if getattr(self, tower) is None:
            raise ValueError(f"this CLIP has no {tower} tower (towers={self.config.towers!r})")

    def vision_hidden(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(last hidden state [B, 1+N, Dv] with the class token first, pooled [B, Dv] post-LN)."""
        self._need("vision")
        return self.vision(images)

    def patch_tokens(self, images: jax.Array) -> jax.Array:
        """The vision tower's patch tokens [B, N, Dv] (HF last_hidden_state[:, 1:])."""
        return self.vision_hidden(images)[0][:, 1:]

    def encode_images(self, images: jax.Array, *, normalize: bool = False) -> jax.Array:
        """images [B, H, W, 3] in the CLIP-normalised space -> [B, E]: unnormalised projected
        embeddings (HF get_image_features) unless `normalize`."""
        _, pooled = self.vision_hidden(images)
        out = pooled if self.visual_proj is None else self.visual_proj(pooled)
        return l2_normalize(out) if normalize else out.astype(jnp.float32)

    def text_hidden(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(last hidden state [B, L, Dt] after the final LN, pooled at end-of-text [B, Dt])."""
        self._need("text")
        return self.text(tokens)

    def encode_texts(self, tokens: jax.Array, *, normalize: bool = False) -> jax.Array:
        """tokens [B, L] (L <= max_text_len) -> [B, E]: unnormalised projected embeddings (HF
        get_text_features) unless `normalize`."""
        _, pooled = self.text_hidden(tokens)
        out = pooled if self.text_proj is None else self.text_proj(pooled)
        return l2_normalize(out) if normalize else out.astype(jnp.float32)

    # -- CoCa's interface (used by evals.clip_score.ClipScorer) -------------------------------------

    def encode_image(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(unit image embeddings [B, E], patch tokens [B, N, Dv])."""
        hidden, pooled = self.vision_hidden(images)
        out = pooled if self.visual_proj is None else self.visual_proj(pooled)
        return l2_normalize(out), hidden[:, 1:]

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """Unit text embeddings [B, E]."""
        return self.encode_texts(tokens, normalize=True)

    def scale(self) -> jax.Array:
        """exp(logit_scale), float32 (HF applies no clamp at inference)."""
        if self.logit_scale is None:
            raise ValueError("a one-tower CLIP has no logit scale")
        return jnp.exp(self.logit_scale[...].astype(jnp.float32))

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
        """dict(image_embed, text_embed (unit), logit_scale (exp'd), logits_per_image [Bi, Bt])."""
        image_embed = self.encode_images(images, normalize=True)
        text_embed = self.encode_texts(tokens, normalize=True)
        scale = self.scale()
        return {"image_embed": image_embed, "text_embed": text_embed, "logit_scale": scale,
                "logits_per_image": scale * image_embed @ text_embed.T}


def create(cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs | None = None) -> CLIP:
    """Builds a CLIP from its config (seed 0 unless `rngs` is given)."""
    return CLIP(cfg, rngs=nnx.Rngs(0) if rngs is None else rngs)
