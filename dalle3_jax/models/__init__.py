"""Model registry: every model of the recipe by name, with its named size variants.

    from dalle3_jax import models
    cfg = models.config("coca", "tiny", vocab_size=1024)   # ml_collections.ConfigDict
    model = models.get("coca", cfg)                         # an nnx.Module, seed 0
    models.variants("coca")                                 # ("tiny", "S", "B", "L")

A registered model lives in a module that provides
    config(variant="...", **overrides) -> ConfigDict   the config, one comment per field
    create(config, *, rngs=None) -> nnx.Module         the model
    VARIANTS: dict[str, dict]                           the size table behind `variant`
Modules are imported on first use, so `import dalle3_jax.models` stays cheap and a model whose
module is missing fails only when asked for.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import jax
import ml_collections
from flax import nnx

# name -> module path. Add a line here to register a new model.
_REGISTRY: dict[str, str] = {
    "coca": "dalle3_jax.models.coca",
    "t5": "dalle3_jax.models.t5",  # the T2I text encoder (relative position bias)
    "unet": "dalle3_jax.models.unet",  # the T2I denoiser
    "t2i": "dalle3_jax.models.t2i",  # text encoder + token bag + UNet, as trained by trainers/t2i.py
    "upsampler": "dalle3_jax.models.upsampler",  # prompt upsampler: T5 encoder + causal decoder
    "clip": "dalle3_jax.models.clip",  # HF CLIPModel layout: pretrained evaluation CLIP / CoCa init
    "autoencoder_kl": "dalle3_jax.models.autoencoder_kl",  # latent-diffusion VAE (diffusers AutoencoderKL layout)
}


def register(name: str, module_path: str) -> None:
    """Registers (or replaces) `name` as the model defined in `module_path`."""
    _REGISTRY[name] = module_path


def names() -> tuple[str, ...]:
    """Registered model names."""
    return tuple(sorted(_REGISTRY))


def _module(name: str) -> ModuleType:
    if name not in _REGISTRY:
        raise KeyError(f"Unknown model {name!r}; registered models: {', '.join(names())}")
    return importlib.import_module(_REGISTRY[name])


def variants(name: str) -> tuple[str, ...]:
    """The variant names of model `name`, smallest first (as listed in its table)."""
    return tuple(_module(name).VARIANTS)


def config(name: str, variant: str = "tiny", **overrides: Any) -> ml_collections.ConfigDict:
    """The config of model `name` at `variant`, with `overrides` applied."""
    return _module(name).config(variant, **overrides)


def get(name: str, cfg: ml_collections.ConfigDict | None = None, *, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """Builds model `name` from `cfg` (default: its tiny config). `rngs` defaults to seed 0."""
    module = _module(name)
    return module.create(module.config() if cfg is None else cfg, rngs=rngs)


def finish_config(c: ml_collections.ConfigDict, table: dict[str, dict], variant: str, overrides: dict[str, Any],
                  what: str) -> ml_collections.ConfigDict:
    """Completes a model module's `config(variant, **overrides)`: applies row `variant` of its
    VARIANTS `table` over the defaults in `c`, then the overrides. KeyError (naming the choices)
    for an unknown variant or a field `c` does not have."""
    if variant not in table:
        raise KeyError(f"Unknown {what} variant {variant!r}; known: {sorted(table)}")
    c.update(table[variant])
    for key, value in overrides.items():
        if key not in c:
            raise KeyError(f"Unknown {what} config field {key!r}; fields: {sorted(c.keys())}")
        c[key] = value
    return c


# What a trainer's `compute_dtype` may be ("" keeps every model block's own `dtype` field).
COMPUTE_DTYPES = ("float32", "bfloat16")


def with_compute_dtype(cfg: ml_collections.ConfigDict, compute_dtype: str) -> ml_collections.ConfigDict:
    """A copy of model config `cfg` whose `dtype` fields, at every depth (the T2I model's text and
    unet blocks, ...), are `compute_dtype`; "" returns `cfg` unchanged.

    Only the compute dtype changes: `param_dtype` fields stay as they are (float32 master weights,
    so the gradients, the optimizer state and the EMA stay float32), and the models keep their
    norms, softmax, logits and losses in float32 whatever the compute dtype (models/layers.py).
    """
    if not compute_dtype:
        return cfg
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype={compute_dtype!r}; valid: {', '.join(COMPUTE_DTYPES)} "
                         "(or '' for each model block's own dtype)")
    out = ml_collections.ConfigDict(cfg.to_dict())

    def visit(block: ml_collections.ConfigDict) -> None:
        for key in block.keys():
            if isinstance(block[key], ml_collections.ConfigDict):
                visit(block[key])
            elif key == "dtype":
                block[key] = compute_dtype

    visit(out)
    return out


def param_count(model: nnx.Module) -> int:
    """Number of trainable parameters (nnx.Param leaves) of a model or abstract model."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
