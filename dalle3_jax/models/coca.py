"""CoCa (Contrastive Captioner): the stage-1 captioner of the recipe, and its losses.

    images [B, H, W, 3] --ViT--> image tokens [B, N, Dv]
        --attentional pool, 1 query-----> LN -> proj -> image_embed [B, E] (unit norm)
        --attentional pool, Nq queries--> LN -> caption queries [B, Nq, Dv]
    tokens [B, L] --unimodal decoder--> hidden [B, L, Dt] and CLS -> LN -> proj -> text_embed [B, E]
        --multimodal decoder (cross-attends to caption queries)--> logits [B, L, V]

Loss = w_con * contrastive(image_embed, text_embed) + w_cap * next-token cross-entropy.
The contrastive term is InfoNCE (symmetric softmax, learned temperature) or the sigmoid loss
(learned scale and bias). Both are plain jnp over the whole batch: under jit with a batch split
over data/fsdp devices XLA gathers the embeddings itself, so the negatives are the global batch.

Usage:

    cfg = coca.config("tiny", vocab_size=1024)
    model = coca.create(cfg, rngs=nnx.Rngs(0))     # or sharding.create_sharded(lambda: ..., mesh)
    loss, metrics = coca.loss_fn(model, batch, w_con=1.0, w_cap=2.0)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from dalle3_jax import models, sharding
from dalle3_jax.models import layers, text, vit

# Architecture per variant name. tiny: tests and fast CPU runs. S/B/L: CoCa-like proportions
# (B matches ViT-B/16 and the CoCa-Base text tower; L is ViT-L/16 with a 12 + 12 layer decoder).
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(image_size=64, patch_size=8, vit_width=128, vit_depth=2, vit_heads=4,
                 text_width=128, text_heads=4, unimodal_layers=2, multimodal_layers=2,
                 n_caption_queries=32, pool_heads=4, embed_dim=128),
    "S": dict(image_size=224, patch_size=16, vit_width=384, vit_depth=12, vit_heads=6,
              text_width=384, text_heads=6, unimodal_layers=6, multimodal_layers=6,
              n_caption_queries=64, pool_heads=6, embed_dim=384),
    "B": dict(image_size=224, patch_size=16, vit_width=768, vit_depth=12, vit_heads=12,
              text_width=768, text_heads=12, unimodal_layers=12, multimodal_layers=12,
              n_caption_queries=256, pool_heads=12, embed_dim=768),
    "L": dict(image_size=224, patch_size=16, vit_width=1024, vit_depth=24, vit_heads=16,
              text_width=1024, text_heads=16, unimodal_layers=12, multimodal_layers=12,
              n_caption_queries=256, pool_heads=16, embed_dim=1024),
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def config(variant: str = "tiny", **overrides: Any) -> ml_collections.ConfigDict:
    """The CoCa config for `variant` ("tiny", "S", "B", "L"), with `overrides` applied.

    Raises KeyError for an unknown variant and for an override that is not a config field.
    """
    c = ml_collections.ConfigDict()
    c.model = "coca"  # registry name (dalle3_jax.models.get)
    c.variant = variant  # the row of VARIANTS the architecture came from
    # --- image tower ---
    c.image_size = 64  # input images are image_size x image_size x 3, values in [-1, 1]
    c.patch_size = 8  # ViT patch side; N = (image_size / patch_size)^2 image tokens
    c.vit_width = 128  # Dv, ViT width (also the width of the pooled image tokens)
    c.vit_depth = 2  # ViT blocks
    c.vit_heads = 4  # ViT attention heads
    c.vit_pos = "learned"  # ViT positions: "learned" table or fixed "sincos" 2D
    c.vit_stem = ()  # channels of 3x3 stride-2 convs before patchifying (e.g. (32, 64)); () = none
    # --- attentional pooling ---
    c.n_caption_queries = 32  # Nq, learned queries whose outputs the multimodal decoder reads;
    # 0 = no caption pooler: the decoder cross-attends to all N image tokens (finer spatial detail)
    c.pool_heads = 4  # heads of both attentional poolers
    # --- text tower ---
    c.vocab_size = 1024  # V, must cover the tokenizer's ids
    c.max_text_len = 128  # longest token sequence (bos .. eos) the position table supports
    c.text_width = 128  # Dt, decoder width
    c.text_heads = 4  # decoder attention heads
    c.unimodal_layers = 2  # causal self-attention-only layers (text embedding comes from here)
    c.multimodal_layers = 2  # causal layers that also cross-attend to the caption queries
    c.tied_embedding = True  # output projection reuses the token embedding matrix
    c.pad_id = 0  # padding token (as is anything after eos): masked from attention, CLS and loss
    c.bos_id = 1  # first token of every sequence; decoding starts from it
    c.eos_id = 2  # end of text; decoding stops after emitting it
    # --- shared ---
    c.mlp_ratio = 4  # MLP hidden width = mlp_ratio * width, in every tower
    c.norm = "layernorm"  # "layernorm" or "rmsnorm" in every block
    c.embed_dim = 128  # E, joint image-text embedding width
    # --- contrastive head ---
    c.contrastive = "softmax"  # default contrastive loss: "softmax" (InfoNCE) or "sigmoid" (SigLIP)
    c.logit_scale_init = math.log(1 / 0.07)  # log temperature^-1 at init (softmax); CLIP's value
    c.logit_scale_max = math.log(100.0)  # the learned log scale is clipped here (CLIP's cap)
    c.sigmoid_scale_init = math.log(10.0)  # log scale at init when contrastive == "sigmoid"
    c.sigmoid_bias_init = -10.0  # logit bias at init for the sigmoid loss (SigLIP's value)
    # --- numerics ---
    c.dtype = "float32"  # compute dtype: "float32" or "bfloat16" (norms/softmax/loss stay f32)
    c.param_dtype = "float32"  # storage dtype of the parameters (the optimizer's master copy)
    return models.finish_config(c, VARIANTS, variant, overrides, "CoCa")


def _dtype(name: str):
    if name not in _DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


class AttentionPool(nnx.Module):
    """Learned queries cross-attend to tokens: [B, N, Dc] -> [B, Q, Dc], then a norm."""

    def __init__(self, width: int, n_queries: int, heads: int, *, norm: str, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.queries = sharding.param(0.02 * jax.random.normal(rngs.params(), (n_queries, width), param_dtype),
                                      ("pos", "embed"))
        # The queries are normalised like the tokens: raw 0.02-scale queries give near-zero
        # attention logits, i.e. a uniform average over the image that keeps colour but loses
        # shape, and the gradient that would sharpen the attention is just as small.
        self.norm_queries = layers.Norm(width, norm, **kw)
        self.norm_context = layers.Norm(width, norm, **kw)
        self.attn = layers.Attention(width, heads, rngs=rngs, **kw)
        self.norm = layers.Norm(width, norm, **kw)
        self.dtype = dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:
        q = jnp.broadcast_to(self.queries[...].astype(self.dtype), (tokens.shape[0],) + self.queries.shape)
        return self.norm(self.attn(self.norm_queries(q), self.norm_context(tokens)))


class CoCa(nnx.Module):
    """Contrastive captioner. See the module docstring for the data flow."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        # Frozen: the config lives in the graph definition, which must be hashable for jit.
        self.config = ml_collections.FrozenConfigDict(cfg)
        c = self.config
        kw = dict(norm=c.norm, dtype=_dtype(c.dtype), param_dtype=_dtype(c.param_dtype))
        self.vision = vit.ViT(
            image_size=c.image_size, patch_size=c.patch_size, width=c.vit_width, depth=c.vit_depth,
            heads=c.vit_heads, mlp_dim=c.mlp_ratio * c.vit_width, pos_embed=c.vit_pos,
            stem_channels=tuple(c.vit_stem), rngs=rngs, **kw,
        )
        self.contrastive_pool = AttentionPool(c.vit_width, 1, c.pool_heads, rngs=rngs, **kw)
        self.caption_pool = (AttentionPool(c.vit_width, c.n_caption_queries, c.pool_heads, rngs=rngs, **kw)
                             if c.n_caption_queries else None)
        self.text = text.TextDecoder(
            vocab_size=c.vocab_size, max_len=c.max_text_len, width=c.text_width, heads=c.text_heads,
            mlp_dim=c.mlp_ratio * c.text_width, unimodal_layers=c.unimodal_layers,
            multimodal_layers=c.multimodal_layers, context_dim=c.vit_width, tied_embedding=c.tied_embedding,
            pad_id=c.pad_id, eos_id=c.eos_id, rngs=rngs, **kw,
        )
        dense_kw = dict(use_bias=False, dtype=kw["dtype"], param_dtype=kw["param_dtype"], rngs=rngs)
        self.image_proj = layers.Dense(c.vit_width, c.embed_dim, ("embed", None), **dense_kw)
        self.text_proj = layers.Dense(c.text_width, c.embed_dim, ("embed", None), **dense_kw)
        sigmoid = c.contrastive == "sigmoid"
        scale0 = c.sigmoid_scale_init if sigmoid else c.logit_scale_init
        self.logit_scale = sharding.param(jnp.asarray(scale0, kw["param_dtype"]), ())
        # Used by the sigmoid loss only; always present so checkpoints have one structure.
        self.logit_bias = sharding.param(jnp.asarray(c.sigmoid_bias_init if sigmoid else 0.0, kw["param_dtype"]), ())

    # -- encoders ---------------------------------------------------------------------------------

    def pool_for_captions(self, image_tokens: jax.Array) -> jax.Array:
        """image tokens [B, N, Dv] -> what the decoder cross-attends to: [B, Nq, Dv], or the
        (already normalised) tokens themselves when n_caption_queries == 0."""
        return image_tokens if self.caption_pool is None else self.caption_pool(image_tokens)

    def caption_queries(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] -> caption-query tokens [B, Nq, Dv] (no contrastive branch)."""
        return self.pool_for_captions(self.vision(images))

    def encode_image(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B, H, W, 3] -> (image_embed [B, E] unit norm, caption queries [B, Nq, Dv])."""
        tokens = self.vision(images)
        pooled = self.contrastive_pool(tokens)[:, 0]
        return l2_normalize(self.image_proj(pooled)), self.pool_for_captions(tokens)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, L] -> text_embed [B, E] unit norm (from the CLS output of the unimodal half)."""
        _, cls = self.text.run_unimodal(tokens, with_cls=True)
        return l2_normalize(self.text_proj(cls))

    def caption_logits(self, caption_queries: jax.Array, tokens: jax.Array) -> jax.Array:
        """Full (uncached) captioning pass: queries [B, Nq, Dv], tokens [B, L] -> logits [B, L, V]."""
        hidden, _ = self.text.run_unimodal(tokens, with_cls=False)
        return self.text.run_multimodal(hidden, tokens, caption_queries)

    def scales(self) -> tuple[jax.Array, jax.Array]:
        """(contrastive logit scale = exp(clipped log scale), logit bias), float32 scalars."""
        log_scale = jnp.minimum(self.logit_scale[...].astype(jnp.float32), self.config.logit_scale_max)
        return jnp.exp(log_scale), self.logit_bias[...].astype(jnp.float32)

    def forward(self, images: jax.Array, tokens: jax.Array, *, contrastive: bool = True, caption: bool = True) -> dict:
        """Runs the branches asked for (static flags) and returns whatever they produce."""
        out: dict[str, jax.Array] = {}
        image_tokens = self.vision(images)
        hidden, cls = self.text.run_unimodal(tokens, with_cls=contrastive)
        if contrastive:
            out["image_embed"] = l2_normalize(self.image_proj(self.contrastive_pool(image_tokens)[:, 0]))
            out["text_embed"] = l2_normalize(self.text_proj(cls))
            out["logit_scale"], out["logit_bias"] = self.scales()
        if caption:
            out["logits"] = self.text.run_multimodal(hidden, tokens, self.pool_for_captions(image_tokens))
        return out

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict:
        """images [B, H, W, 3], tokens [B, L] -> dict(image_embed [B, E], text_embed [B, E],
        logits [B, L, V] (position t predicts token t+1), logit_scale, logit_bias)."""
        return self.forward(images, tokens)

    # -- incremental decoding (used by dalle3_jax.recaption.decode) -------------------------------

    def start_decoding(self, images: jax.Array, cache_len: int) -> tuple[list, dict]:
        """Encodes images once: (cross-attention K/V per multimodal layer, empty self-attn cache)."""
        return self.text.cross_kv(self.caption_queries(images)), self.text.init_cache(images.shape[0], cache_len)

    def decode_step(self, tokens: jax.Array, index: jax.Array, cache: dict, cross_kv: list) -> tuple[jax.Array, dict]:
        """tokens [B, T] at positions index.. -> (logits [B, T, V], cache)."""
        return self.text.decode_step(tokens, index, cache, cross_kv)

    def decode_context(self, images: jax.Array) -> jax.Array:
        """What the uncached reference decoder (decode.generate_uncached) conditions on."""
        return self.caption_queries(images)

    def decode_logits(self, context: jax.Array, tokens: jax.Array) -> jax.Array:
        """The reference decoder's full pass: context from `decode_context`, tokens [B, L] -> logits."""
        return self.caption_logits(context, tokens)


def create(cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs | None = None) -> CoCa:
    """Builds a CoCa model from its config (seed 0 unless `rngs` is given)."""
    return CoCa(cfg, rngs=nnx.Rngs(0) if rngs is None else rngs)


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------


def _similarities(image_embed: jax.Array, text_embed: jax.Array) -> jax.Array:
    """[B, E] x [B, E] -> cosine similarities [B, B] over the global batch.

    Every device keeps its own image rows and sees all texts (the text embeddings, B x E, are
    all-gathered: cheap), so the [B, B] matrix is split by rows like the batch.
    """
    image_embed = sharding.constrain(image_embed, ("batch", None))
    text_embed = sharding.constrain(text_embed, (None, None))
    return sharding.constrain(image_embed @ text_embed.T, ("batch", None))


def softmax_contrastive_loss(
    image_embed: jax.Array, text_embed: jax.Array, scale: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Symmetric InfoNCE over the batch: matching pairs on the diagonal. Returns (loss, the
    image->text top-1 retrieval accuracy)."""
    logits = scale * _similarities(image_embed, text_embed)  # [B, B]
    labels = jnp.arange(logits.shape[0])
    i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
    accuracy = jnp.mean(jnp.argmax(logits, axis=1) == labels)
    return 0.5 * (jnp.mean(i2t) + jnp.mean(t2i)), accuracy


def sigmoid_contrastive_loss(
    image_embed: jax.Array, text_embed: jax.Array, scale: jax.Array, bias: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """SigLIP loss: every (image, text) pair is an independent binary problem, +1 on the
    diagonal and -1 elsewhere; summed over texts, averaged over images."""
    logits = scale * _similarities(image_embed, text_embed) + bias
    signs = 2.0 * jnp.eye(logits.shape[0]) - 1.0
    loss = -jnp.mean(jnp.sum(jax.nn.log_sigmoid(signs * logits), axis=1))
    accuracy = jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0]))
    return loss, accuracy


def caption_loss(logits: jax.Array, tokens: jax.Array, pad_id: int, eos_id: int) -> tuple[jax.Array, jax.Array]:
    """Next-token cross-entropy, logits [B, L, V] vs tokens [B, L]; position t predicts t+1.

    Targets that are padding (pad ids, or anything after the first eos) are masked; eos itself
    is a target, so the model learns to stop. The mean is over all real target tokens of the
    batch (long captions weigh more than short ones). Returns (loss, token accuracy).
    """
    logits, targets = logits[:, :-1].astype(jnp.float32), tokens[:, 1:]
    mask = text.token_mask(tokens, pad_id, eos_id)[:, 1:].astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask), 1.0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(ce * mask) / n, jnp.sum(correct * mask) / n


def loss_fn(
    model: CoCa, batch: dict, *, w_con: float = 1.0, w_cap: float = 1.0, contrastive: str | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CoCa loss on batch = {"image": [B, H, W, 3] in [-1, 1], "tokens": int [B, L], ...}.

    w_con / w_cap must be Python numbers: a zero weight removes that branch from the program
    (w_con = 0 skips the contrastive pooler, the CLS token and the [B, B] similarity matrix).
    `contrastive` = "softmax" | "sigmoid" (default: the model config's choice).
    Returns (loss, metrics) with loss, contrastive_loss, caption_loss, token_accuracy,
    contrastive_accuracy, logit_scale, logit_bias.
    """
    kind = model.config.contrastive if contrastive is None else contrastive
    if kind not in ("softmax", "sigmoid"):
        raise ValueError(f"Unknown contrastive loss {kind!r}; expected 'softmax' or 'sigmoid'.")
    use_con, use_cap = float(w_con) != 0.0, float(w_cap) != 0.0
    if not (use_con or use_cap):
        raise ValueError("w_con and w_cap are both 0: nothing to train.")
    out = model.forward(batch["image"], batch["tokens"], contrastive=use_con, caption=use_cap)
    zero = jnp.zeros((), jnp.float32)
    con_loss = con_acc = cap_loss = tok_acc = zero
    scale, bias = model.scales() if not use_con else (out["logit_scale"], out["logit_bias"])
    if use_con:
        if kind == "softmax":
            con_loss, con_acc = softmax_contrastive_loss(out["image_embed"], out["text_embed"], scale)
        else:
            con_loss, con_acc = sigmoid_contrastive_loss(out["image_embed"], out["text_embed"], scale, bias)
    if use_cap:
        cap_loss, tok_acc = caption_loss(out["logits"], batch["tokens"], model.config.pad_id, model.config.eos_id)
    loss = w_con * con_loss + w_cap * cap_loss
    metrics = {
        "loss": loss, "contrastive_loss": con_loss, "caption_loss": cap_loss, "token_accuracy": tok_acc,
        "contrastive_accuracy": con_acc, "logit_scale": scale, "logit_bias": bias,
    }
    return loss, metrics
