"""Pretrained weight import from Hugging Face checkpoint directories on local disk.

`safetensors_io` is the one reader every importer uses (config.json, single-file or sharded
safetensors, no PyTorch and no pickle at run time) and `assign`, which fills an nnx model's
params by a mapping with shape checks and keeps their sharding. The importers:

    dalle3_jax.weights.clip   load_clip(dir) -> (CLIP model, info); CLIP vision -> CoCa ViT
    dalle3_jax.weights.t5     load_t5_encoder(dir, mesh=...) -> (T5 encoder, info), T5 v1.0 and v1.1
    dalle3_jax.weights.vae    load_autoencoder_kl(dir, mesh=...) -> (AutoencoderKL, info)
"""

from dalle3_jax.weights.safetensors_io import (  # noqa: F401
    CheckpointError,
    LazyTensors,
    LoadReport,
    assign,
    load_config,
    load_tensors,
    open_tensors,
    param_paths,
    path_str,
    weight_files,
)
