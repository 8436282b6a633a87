"""Pretrained T5 encoders from Hugging Face checkpoint directories, as `models.t5.T5Encoder`s.

    encoder, info = load_t5_encoder("/ckpt/flan-t5-xl", mesh=mesh)   # sharded, never whole on a device
    enc = encoder(tokens)                                           # TextEncoding: states [B, L, D], ...

A directory written by `T5EncoderModel` or `T5ForConditionalGeneration.save_pretrained` (config.json
+ model.safetensors or a sharded index) is read with `safetensors_io`; only the encoder is used, the
decoder and the language-model head are skipped by name. Both layouts are supported:

    T5 v1.0            feed_forward_proj "relu":        DenseReluDense.wi, .wo
    T5 v1.1, Flan-T5   feed_forward_proj "gated-gelu":  DenseReluDense.wi_0 (through GELU), .wi_1, .wo

Checkpoint names -> ours (i = block index; q/k/v [H*K, D] become [D, H, K] kernels, o [D, H*K]
becomes [H, K, D], every other Linear [out, in] is transposed):

    shared.weight (or encoder.embed_tokens.weight)                    token_embed [V, D]
    encoder.block.0.layer.0.SelfAttention.relative_attention_bias     rel_bias.table [buckets, H]
    encoder.block.i.layer.0.layer_norm / .SelfAttention.{q,k,v,o}     blocks.i.norm_attn / .attn.{query,key,value,out}
    encoder.block.i.layer.1.layer_norm / .DenseReluDense.*            blocks.i.norm_mlp / .mlp.{wi,wi_linear,wo}
    encoder.final_layer_norm                                          norm_out

T5 specifics the encoder reproduces (see models/t5.py): no 1/sqrt(K) on the attention logits, the
position bias only in the first layer and shared by all, RMSNorm without mean or bias, inner
attention width H * K that may differ from D.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import ml_collections
from flax import nnx

from dalle3_jax import sharding
from dalle3_jax.models import layers, t5
from dalle3_jax.weights import safetensors_io as sio

MODEL_TYPES = ("t5", "mt5")  # mT5 is T5 v1.1 with a larger vocabulary
# Checkpoint keys that belong to the parts of a T5ForConditionalGeneration we do not use.
IGNORED_KEYS = ("decoder.*", "lm_head.*")
_BIAS_KEY = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def feed_forward_of(hf: dict[str, Any]) -> str:
    """The encoder's feed_forward option for a Hugging Face T5 config's `feed_forward_proj`.

    "gated-gelu" means the tanh-approximate GELU ("gelu_new") in T5 v1.1 checkpoints, while a plain
    "gelu" is the exact one; either may carry the "gated-" prefix."""
    proj = str(hf.get("feed_forward_proj", "relu"))
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise sio.CheckpointError(f"feed_forward_proj={proj!r} is not '<act>' or 'gated-<act>'")
    name = "gated-gelu_new" if proj == "gated-gelu" else proj
    try:
        t5.parse_feed_forward(name)
    except ValueError as e:
        raise sio.CheckpointError(f"feed_forward_proj={proj!r}: {e}") from None
    return name


def encoder_config(path_or_config: str | os.PathLike | dict[str, Any], *,
                   dtype: str = "float32") -> ml_collections.ConfigDict:
    """Our `models.t5.config` for a checkpoint directory (or its config.json as a dict).

    dtype: the compute dtype name ("float32", "bfloat16"); norms and softmax stay float32."""
    hf = path_or_config if isinstance(path_or_config, dict) else sio.load_config(path_or_config)
    model_type = hf.get("model_type", "t5")
    if model_type not in MODEL_TYPES:
        raise sio.CheckpointError(f"config.json has model_type={model_type!r}; a T5 encoder needs one of "
                                  f"{MODEL_TYPES}")
    missing = [k for k in ("d_model", "d_kv", "num_heads", "d_ff", "num_layers", "vocab_size") if k not in hf]
    if missing:
        raise sio.CheckpointError(f"config.json lacks the T5 fields {missing}")
    return t5.config(
        "tiny",  # every size below comes from the checkpoint, not from the variant
        vocab_size=int(hf["vocab_size"]), width=int(hf["d_model"]), depth=int(hf["num_layers"]),
        heads=int(hf["num_heads"]), head_dim=int(hf["d_kv"]), mlp_dim=int(hf["d_ff"]),
        num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        max_distance=int(hf.get("relative_attention_max_distance", 128)),
        pad_id=int(hf.get("pad_token_id", 0)), eos_id=int(hf.get("eos_token_id", 1)),
        feed_forward=feed_forward_of(hf), use_bias=False, scaled_attention=False,
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)), dtype=dtype,
    )


def weight_mapping(cfg: ml_collections.ConfigDict, keys) -> sio.MappingSpec:
    """Our param path -> (checkpoint key, transform) for an encoder of config `cfg`, given the
    checkpoint's key names (which decide where the token embedding is read from)."""
    heads = int(cfg.heads)
    # T5EncoderModel ties encoder.embed_tokens to shared and usually saves only shared.weight;
    # some exports keep both (identical), a few only the encoder's.
    embed = "encoder.embed_tokens.weight" if "encoder.embed_tokens.weight" in keys else "shared.weight"
    m: dict[str, tuple[str, Any]] = {
        "token_embed": (embed, None),
        "rel_bias.table": (_BIAS_KEY, None),
        "norm_out.scale": ("encoder.final_layer_norm.weight", None),
    }
    _, gated = t5.parse_feed_forward(cfg.feed_forward)
    for i in range(int(cfg.depth)):
        hf, ours = f"encoder.block.{i}.layer", f"blocks.{i}"
        m[f"{ours}.norm_attn.scale"] = (f"{hf}.0.layer_norm.weight", None)
        for name, key in (("query", "q"), ("key", "k"), ("value", "v")):
            m[f"{ours}.attn.{name}.kernel"] = (f"{hf}.0.SelfAttention.{key}.weight", sio.linear_to_heads(heads))
        m[f"{ours}.attn.out.kernel"] = (f"{hf}.0.SelfAttention.o.weight", sio.heads_to_linear(heads))
        m[f"{ours}.norm_mlp.scale"] = (f"{hf}.1.layer_norm.weight", None)
        ff = f"{hf}.1.DenseReluDense"
        m[f"{ours}.mlp.wi.kernel"] = (f"{ff}.wi_0.weight" if gated else f"{ff}.wi.weight", sio.linear)
        if gated:
            m[f"{ours}.mlp.wi_linear.kernel"] = (f"{ff}.wi_1.weight", sio.linear)
        m[f"{ours}.mlp.wo.kernel"] = (f"{ff}.wo.weight", sio.linear)
    return m


def load_into(encoder: t5.T5Encoder | nnx.State, path: str | os.PathLike,
              cfg: ml_collections.ConfigDict | None = None) -> sio.LoadReport:
    """Fills an existing encoder (concrete, sharded or abstract) from checkpoint `path`, in place.

    Each tensor is read, transformed and placed on its param's sharding one at a time. A
    CheckpointError lists every missing or unexpected key and every shape mismatch (our path,
    the checkpoint key and both shapes); unused decoder / lm_head keys are expected."""
    cfg = encoder_config(path) if cfg is None else cfg
    tensors = sio.open_tensors(path)
    ignore = IGNORED_KEYS
    if "encoder.embed_tokens.weight" in tensors:
        ignore += ("shared.weight",)  # the tied copy of the embedding we read
    return sio.assign(encoder, weight_mapping(cfg, tensors), tensors, ignore=ignore,
                      what=f"T5 checkpoint {os.fspath(path)!r}")


def load_t5_encoder(path: str | os.PathLike, *, mesh=None, dtype: Any = jnp.float32,
                    param_dtype: Any = jnp.float32) -> tuple[t5.T5Encoder, dict[str, Any]]:
    """The encoder of an HF T5 checkpoint directory with its weights, and an info dict.

    mesh: with a mesh, every weight is born on its fsdp/tensor sharding (heads and MLP units over
        "tensor", the width over "fsdp"): the model is built abstractly (no memory, no random
        init) and each tensor goes straight from the file to its devices' slices. Without one,
        the weights land on the default device.
    dtype: compute dtype (a jnp dtype or its name); param_dtype: storage dtype of the weights.

    info: "config" (our t5 config), "hf_config" (config.json), "report" (safetensors_io.LoadReport),
    "path", "pad_id" and "eos_id" (the token ids the encoder masks on).
    """
    hf = sio.load_config(path)
    dtype_name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    layers.dtype_of(dtype_name)  # a clear error for an unsupported compute dtype
    cfg = encoder_config(hf, dtype=dtype_name)

    def ctor():
        return t5.create(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype)

    if mesh is None:  # the default device (whatever mesh the caller may have set)
        mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1, num_devices=1))
    graphdef, abstract = sharding.abstract_state(ctor, mesh)
    encoder = nnx.merge(graphdef, abstract)
    report = load_into(encoder, path, cfg)
    info = {"config": cfg, "hf_config": hf, "report": report, "path": os.fspath(path),
            "pad_id": int(cfg.pad_id), "eos_id": int(cfg.eos_id)}
    return encoder, info
