"""The learned prompt upsampler: a small T5-style encoder-decoder, short prompt -> descriptive one.

    source tokens [B, S] --T5Encoder (relative position bias, bidirectional)--> states [B, S, D]
    target tokens [B, L] --TextDecoder (causal self-attention, cross-attention to the states,
        padding of the source masked)--> next-token logits [B, L, V]

Trained on (short caption, descriptive caption) pairs of the same images: the recaption job's
(SSC, DSC) captions, or the world's ground-truth (short, descriptive) ones
(trainers/upsampler.py). The short caption names the main subject; the descriptive one adds what
it leaves out (size, places, the background, other groups), so the model learns the world's
distribution of scenes given a subject, and sampling with a seed draws one plausible scene.

Both halves are the project's text modules: the encoder is `t5.T5Encoder` (the T2I text encoder's
architecture), the decoder is `text.TextDecoder` (the CoCa caption decoder) with no unimodal half
and no CLS token; its cross-attention reads the encoder states with the source padding masked.
Decoding goes through `dalle3_jax.recaption.decode` (KV cache, greedy / beam / sampling):
`start_decoding` encodes the source once and returns the cross-attention K/V with the mask.

    cfg = upsampler.config("S")
    model = upsampler.create(cfg, rngs=nnx.Rngs(0))          # or models.get("upsampler", cfg)
    logits = model(source_tokens, target_tokens)
    loss, metrics = upsampler.loss_fn(model, {"source": ..., "tokens": ...})

Dimension letters: B batch, S source length, L target length, D width, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from flax import nnx

from dalle3_jax import models
from dalle3_jax.models import coca, layers, t5, text

# Sizes per variant. tiny: tests. S: the shapes world (0.93M parameters with the packaged
# 1009-token vocabulary, a third of them the two token tables; on one-object scenes it keeps every
# prompt fact after 400 steps of batch 64). B: a larger model for multi-object scenes or real captions.
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(width=32, heads=2, encoder_layers=1, decoder_layers=1, mlp_ratio=2),
    "S": dict(width=128, heads=4, encoder_layers=2, decoder_layers=2, mlp_ratio=2),
    "B": dict(width=256, heads=8, encoder_layers=4, decoder_layers=6, mlp_ratio=4),
}


def config(variant: str = "S", **overrides: Any) -> ml_collections.ConfigDict:
    """The upsampler config for `variant`; KeyError for an unknown variant or field."""
    c = ml_collections.ConfigDict()
    c.model = "upsampler"  # registry name (dalle3_jax.models.get)
    c.variant = variant  # the row of VARIANTS the sizes came from
    c.vocab_size = 1024  # >= the tokenizer's vocabulary
    c.max_source_len = 24  # prompt tokens (bos .. eos): short captions <= 6, SSC output <= 17; longer is refused
    c.max_target_len = 80  # description tokens (bos .. eos) the position table holds
    c.width = 128  # D, encoder and decoder width
    c.heads = 4  # attention heads
    c.encoder_layers = 2  # bidirectional encoder blocks
    c.decoder_layers = 2  # causal decoder blocks, each cross-attending to the encoder
    c.mlp_ratio = 2  # MLP hidden width = mlp_ratio * width
    c.num_buckets = 32  # encoder relative-position buckets (T5's value)
    c.max_distance = 128  # encoder distances beyond this share the last bucket
    c.tied_embedding = True  # the decoder's output projection reuses its token embedding
    c.pad_id = 0  # padding (and anything after eos): masked from attention and the loss
    c.bos_id = 1  # first token of every sequence; decoding starts from it
    c.eos_id = 2  # end of text; decoding stops after emitting it
    c.dtype = "float32"  # compute dtype; norms, softmax and the loss stay float32
    c.param_dtype = "float32"  # storage dtype of the parameters
    return models.finish_config(c, VARIANTS, variant, overrides, "upsampler")


class Upsampler(nnx.Module):
    """Encoder-decoder text model (see the module docstring)."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        # Frozen: the config lives in the graph definition, which must be hashable for jit.
        self.config = ml_collections.FrozenConfigDict(cfg)
        c = self.config
        dtype, param_dtype = layers.dtype_of(c.dtype), layers.dtype_of(c.param_dtype)
        mlp_dim = c.mlp_ratio * c.width
        self.encoder = t5.T5Encoder(vocab_size=c.vocab_size, width=c.width, depth=c.encoder_layers, heads=c.heads,
                                    mlp_dim=mlp_dim, num_buckets=c.num_buckets, max_distance=c.max_distance,
                                    pad_id=c.pad_id, eos_id=c.eos_id, dtype=dtype, rngs=rngs)
        self.decoder = text.TextDecoder(
            vocab_size=c.vocab_size, max_len=c.max_target_len, width=c.width, heads=c.heads, mlp_dim=mlp_dim,
            unimodal_layers=0, multimodal_layers=c.decoder_layers, context_dim=c.width,
            tied_embedding=c.tied_embedding, cls_token=False, norm="rmsnorm", pad_id=c.pad_id, eos_id=c.eos_id,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )

    def _check_source(self, source: jax.Array) -> None:
        if source.ndim != 2:
            raise ValueError(f"source tokens must be [B, S], got shape {source.shape}")
        if source.shape[1] > self.config.max_source_len:
            raise ValueError(f"source length {source.shape[1]} exceeds max_source_len {self.config.max_source_len}")

    def encode(self, source: jax.Array) -> tuple[jax.Array, jax.Array]:
        """source [B, S] -> (encoder states [B, S, D], cross-attention mask [B, 1, 1, S])."""
        self._check_source(source)
        enc = self.encoder(source)
        return enc.states, layers.key_mask(enc.mask)

    def __call__(self, source: jax.Array, tokens: jax.Array) -> jax.Array:
        """source [B, S], target tokens [B, L] (bos .. eos pad) -> logits [B, L, V]; position t
        predicts token t + 1."""
        return self.decode_logits(self.encode(source), tokens)

    # -- decoding (dalle3_jax.recaption.decode) -------------------------------------------------

    def decode_context(self, source: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.encode(source)

    def decode_logits(self, context: tuple[jax.Array, jax.Array], tokens: jax.Array) -> jax.Array:
        states, mask = context
        hidden, _ = self.decoder.run_unimodal(tokens, with_cls=False)  # no unimodal layers: the embedding
        return self.decoder.run_multimodal(hidden, tokens, states, mask)

    def start_decoding(self, source: jax.Array, cache_len: int) -> tuple[dict, dict]:
        """Encodes the source once: ({cross-attention K/V per layer, source mask}, empty caches)."""
        states, mask = self.encode(source)
        cross = {"kv": self.decoder.cross_kv(states), "mask": mask}
        return cross, self.decoder.init_cache(source.shape[0], cache_len)

    def decode_step(self, tokens: jax.Array, index: jax.Array, cache: dict, cross: dict) -> tuple[jax.Array, dict]:
        """tokens [B, T] at positions index.. -> (logits [B, T, V], cache)."""
        return self.decoder.decode_step(tokens, index, cache, cross["kv"], cross["mask"])


def create(cfg: ml_collections.ConfigDict | None = None, *, rngs: nnx.Rngs | None = None) -> Upsampler:
    """The upsampler of config `cfg` (default: the S variant), seeded by `rngs` (default seed 0)."""
    return Upsampler(config() if cfg is None else cfg, rngs=rngs or nnx.Rngs(0))


def loss_fn(model: Upsampler, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token cross-entropy of the description given the prompt.

    batch = {"source": int [B, S] (the short prompt), "tokens": int [B, L] (the description,
    bos .. eos pad)}; padding targets are masked and eos is a target (coca.caption_loss).
    Returns (loss, {"token_accuracy"}).
    """
    logits = model(batch["source"], batch["tokens"])
    loss, accuracy = coca.caption_loss(logits, batch["tokens"], model.config.pad_id, model.config.eos_id)
    return loss, {"token_accuracy": accuracy}
