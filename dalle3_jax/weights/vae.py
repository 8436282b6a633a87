"""Import a diffusers `AutoencoderKL` (the Stable Diffusion VAE) into `models.autoencoder_kl`.

    from dalle3_jax.weights.vae import load_autoencoder_kl
    vae, info = load_autoencoder_kl("/ckpt/sd-vae-ft-mse")     # a save_pretrained directory
    z = vae.latents(images)                                    # [B, H, W, 3] in [-1, 1] -> [B, H/8, W/8, 4]
    images = vae.images_from_latents(z)

The directory is what `AutoencoderKL.save_pretrained(dir, safe_serialization=True)` writes
(config.json + diffusion_pytorch_model.safetensors, or a sharded index); a full Stable Diffusion
pipeline directory (one with a `vae/` subfolder and no config.json of its own) is read from `vae/`. The model config is built from
config.json; every parameter is filled from the checkpoint and every checkpoint tensor must be
used, or a `CheckpointError` names what is missing, unexpected or mis-shaped.

Layout differences handled here: PyTorch convolutions are [O, I, kh, kw] (ours [kh, kw, I, O]);
the mid-block attention is stored as Linear layers (to_q/to_k/to_v/to_out.0) or, in checkpoints
written before diffusers renamed it, as query/key/value/proj_attn, possibly as 1x1 convolutions.
The parameters are created abstractly (no random initialisation) and placed directly with the
model's sharding on `mesh`, so only one tensor at a time passes through host memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Container, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from dalle3_jax import sharding
from dalle3_jax.models import autoencoder_kl
from dalle3_jax.weights import safetensors_io as sio

log = logging.getLogger(__name__)

# Module-path pieces: ours -> diffusers (applied in order to the path without its leaf name).
_RENAMES = (
    (".mid.block1", ".mid_block.resnets.0"),
    (".mid.block2", ".mid_block.resnets.1"),
    (".mid.attn.norm", ".mid_block.attentions.0.group_norm"),
    (".mid.attn.attention", ".mid_block.attentions.0"),
    (".skip", ".conv_shortcut"),
    (".norm_out", ".conv_norm_out"),
)
# Attention projections: ours -> (current diffusers name, the name in older checkpoints).
_ATTENTION = {"query": ("to_q", "query"), "key": ("to_k", "key"), "value": ("to_v", "value"),
              "out": ("to_out.0", "proj_attn")}
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def model_config(hf: dict[str, Any]) -> ml_collections.ConfigDict:
    """Our autoencoder config from a diffusers AutoencoderKL config.json dict; CheckpointError
    for an architecture this module does not implement."""
    cls = hf.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise sio.CheckpointError(f"config.json describes a {cls!r}; expected an 'AutoencoderKL'.")
    missing = [k for k in ("block_out_channels", "layers_per_block", "latent_channels") if k not in hf]
    if missing:
        raise sio.CheckpointError(f"config.json lacks {missing}, which an AutoencoderKL config has.")
    chans = tuple(int(c) for c in hf["block_out_channels"])
    for field, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        kinds = list(hf.get(field, [want] * len(chans)))
        if len(kinds) != len(chans) or any(k != want for k in kinds):
            raise sio.CheckpointError(f"config.json {field} {kinds}: only {len(chans)} x {want!r} is supported.")
    if hf.get("act_fn", "silu") != "silu":
        raise sio.CheckpointError(f"config.json act_fn {hf['act_fn']!r}: only 'silu' is supported.")
    if hf.get("norm_type", "group") != "group":
        raise sio.CheckpointError(f"config.json norm_type {hf['norm_type']!r}: only 'group' is supported.")
    size = hf.get("sample_size", 512)
    size = size[0] if isinstance(size, (list, tuple)) else size
    # Every size field is set from config.json, so the "sd" row only supplies the field list.
    return autoencoder_kl.config(
        "sd",
        image_size=int(size),
        in_channels=int(hf.get("in_channels", 3)),
        out_channels=int(hf.get("out_channels", 3)),
        block_out_channels=chans,
        layers_per_block=int(hf["layers_per_block"]),
        norm_num_groups=int(hf.get("norm_num_groups", 32)),
        latent_channels=int(hf["latent_channels"]),
        mid_attention=bool(hf.get("mid_block_add_attention", True)),
        use_quant_conv=bool(hf.get("use_quant_conv", True)),
        use_post_quant_conv=bool(hf.get("use_post_quant_conv", True)),
        scaling_factor=float(hf.get("scaling_factor", 0.18215)),
        shift_factor=float(hf.get("shift_factor") or 0.0),
    )


def _conv(x: np.ndarray) -> np.ndarray:
    # A tensor of the wrong rank passes through unchanged, so that `assign` reports it as a shape
    # mismatch naming the key and both shapes.
    return sio.conv2d(x) if np.ndim(x) == 4 else x


def _matrix(x: np.ndarray) -> np.ndarray | None:
    """A Linear weight [O, I], also from a 1x1 conv [O, I, 1, 1]; None for anything else."""
    if np.ndim(x) == 4 and np.shape(x)[2:] == (1, 1):
        return np.asarray(x)[:, :, 0, 0]
    return np.asarray(x) if np.ndim(x) == 2 else None


def _attention_transform(proj: str, leaf: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """Transform of a single-head attention weight into our [C, 1, C] / [1, C, C] / [1, C] params
    (anything of an unexpected rank passes through for `assign` to report)."""
    if proj == "out":
        if leaf == "bias":
            return None
        return lambda x: x if _matrix(x) is None else sio.heads_to_linear(1)(_matrix(x))
    if leaf == "bias":
        return lambda x: x if np.ndim(x) != 1 else sio.bias_to_heads(1)(x)
    return lambda x: x if _matrix(x) is None else sio.linear_to_heads(1)(_matrix(x))


def checkpoint_mapping(paths: Iterable[str], keys: Container[str]) -> sio.MappingSpec:
    """our param path -> (diffusers key, transform) for every path in `paths`; `keys` (the
    checkpoint's tensor names) decides between current and older attention names."""
    mapping = {}
    for path in paths:
        module, leaf = path.rsplit(".", 1)
        name = f".{module}."  # dots on both sides, so a rename only matches whole pieces
        for ours, theirs in _RENAMES:
            name = name.replace(ours + ".", theirs + ".")
        kind = "downsamplers" if name.startswith(".encoder.") else "upsamplers"
        name = name.replace(".resample.conv.", f".{kind}.0.conv.").strip(".")
        base, _, proj = name.rpartition(".")
        if base.endswith(".mid_block.attentions.0") and proj in _ATTENTION:
            new, old = (f"{base}.{n}.{_LEAVES[leaf]}" for n in _ATTENTION[proj])
            mapping[path] = (old if new not in keys and old in keys else new, _attention_transform(proj, leaf))
        else:
            mapping[path] = (f"{name}.{_LEAVES[leaf]}", _conv if leaf == "kernel" else None)
    return mapping


def load_autoencoder_kl(path: str | os.PathLike, *, mesh: Mesh | None = None,
                        dtype: str = "float32") -> tuple[autoencoder_kl.AutoencoderKL, dict[str, Any]]:
    """(model, info) from a diffusers AutoencoderKL directory (config.json + safetensors).

    mesh: place every parameter with the project's sharding rules on this mesh (default: the
    default device). dtype: the model's compute dtype (parameters stay float32).
    info: "config" (our ConfigDict), "hf_config" (config.json), "report" (sio.LoadReport), "path",
    and "latents_mean" / "latents_std" from config.json (None for the SD VAEs; recorded, not applied).
    """
    path = os.fspath(path)
    if not (Path(path) / "config.json").is_file() and (Path(path) / "vae" / "config.json").is_file():
        path = os.path.join(path, "vae")  # a whole diffusers pipeline: its VAE lives in vae/
    hf = sio.load_config(path)
    cfg = model_config(hf)
    cfg.dtype = dtype
    tensors = sio.open_tensors(path)
    ctor = lambda: autoencoder_kl.create(cfg)  # noqa: E731
    if mesh is None:
        graphdef, state = nnx.split(nnx.eval_shape(ctor))
    else:
        graphdef, state = sharding.abstract_state(ctor, mesh)
    mapping = checkpoint_mapping(sio.param_paths(state), set(tensors))
    report = sio.assign(state, mapping, tensors, what=f"AutoencoderKL checkpoint {path!r}")
    log.info("load_autoencoder_kl %s: %s", path, report.summary())
    model = nnx.merge(graphdef, state)
    info = dict(config=cfg, hf_config=hf, report=report, path=path, latents_mean=hf.get("latents_mean"),
                latents_std=hf.get("latents_std"))
    return model, info
