"""Trainers: one shared loop (loop.py); each stage contributes a Task (its model, loss, data, evals).

`TRAINERS` maps `config.trainer` to the module whose `build_task(config, workdir)` returns the
stage's Task; modules are imported on demand so a stage's dependencies load only when used.
"""

from __future__ import annotations

import importlib

TRAINERS = {
    "captioner": "dalle3_jax.trainers.captioner",
    "t2i": "dalle3_jax.trainers.t2i",
    "upsampler": "dalle3_jax.trainers.upsampler",  # the learned prompt upsampler (configs/upsampler.py)
    "clip": "dalle3_jax.trainers.clip",  # the evaluation CLIP (configs/eval_clip.py)
    "autoencoder": "dalle3_jax.trainers.autoencoder",  # latent-diffusion VAE from scratch (configs/autoencoder.py)
}


def build_task(config, workdir: str):
    """The Task for `config.trainer`; a clear error names the valid trainers."""
    name = config.trainer
    if name not in TRAINERS:
        valid = ", ".join(sorted(TRAINERS)) or "(none registered)"
        raise ValueError(f"unknown config.trainer={name!r}; valid trainers: {valid}")
    module = importlib.import_module(TRAINERS[name])
    return module.build_task(config, workdir)
