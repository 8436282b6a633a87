"""The latent-diffusion autoencoder as a Task of the shared loop, for users without a pretrained VAE.

    model   models/autoencoder_kl.py at `model.variant` (default tiny: 128 px -> 32 x 32 x 4)
    loss    reconstruction (L1 or L2, per pixel) of a posterior sample + kl_weight x the KL
            divergence to N(0, I) (per latent element)
    evals   on held-out images (the world's eval split, or eval.split of the data): L1, MSE,
            PSNR of the reconstruction through the posterior mean, the KL, the standard
            deviation of the latents and the scaling_factor that would give them unit variance,
            and a grid of (original, reconstruction) pairs

A trained run plugs into latent T2I as `autoencoder.variant=<variant>,
autoencoder.checkpoint=<workdir>` (the model is saved under `model`, like every run). The
diffusion model sees `(z - shift_factor) * scaling_factor`: keep the variant's scaling_factor
close to the `suggested_scaling_factor` this trainer reports, or the UNet's inputs are not of
unit variance.

There is no perceptual or adversarial loss (Stable Diffusion's VAE has both), so reconstructions
of natural images are blurrier; on the synthetic world's flat shapes L1 alone is sharp.
`configs/autoencoder.py` builds on `default_config()`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dalle3_jax import metrics, sharding
from dalle3_jax.data import pipeline, sources
from dalle3_jax.models import autoencoder_kl
from dalle3_jax.trainers import loop

RECONSTRUCTIONS = ("l1", "l2")


def default_config(smoke: bool = False, *, variant: str = "tiny", image_size: int = 128) -> ml_collections.ConfigDict:
    """An autoencoder config; `smoke` shrinks it to a seconds-long run for tests."""
    c = loop.loop_config()
    c.trainer = "autoencoder"
    c.total_steps = 5000
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500
    c.model = autoencoder_kl.config(variant)  # architecture (models/autoencoder_kl.py)
    c.data = sources.default_data_config()  # any image source; captions are read but unused
    c.data.world = ml_collections.ConfigDict(dict(image_size=image_size))
    c.input = pipeline.default_input_config()
    c.input.global_batch_size = 32
    c.input.image_size = image_size  # must be divisible by the model's downsample factor
    c.input.max_text_len = 8  # the loader tokenises captions; nothing reads them
    c.loss = ml_collections.ConfigDict()
    c.loss.reconstruction = "l1"  # l1 | l2, mean over pixels and channels
    # Mean KL per latent element. Small: it only keeps the latents from drifting in scale and
    # makes the posterior smooth; a larger weight trades reconstruction detail for it.
    c.loss.kl_weight = 1e-6
    c.loss.sample = True  # decode a posterior sample (the VAE objective); False = the mean
    c.eval = ml_collections.ConfigDict()
    c.eval.split = "eval"  # held-out split of the same source
    c.eval.n_examples = 256  # images of the figures
    c.eval.batch_size = 32
    c.eval.n_grid = 8  # (original, reconstruction) pairs in the logged grid
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.optim.weight_decay = 0.0
    if smoke:
        loop.smoke_settings(c)
        c.eval.n_examples = 8
        c.eval.batch_size = 8
        c.eval.n_grid = 4
    return c


def check_config(config: ml_collections.ConfigDict) -> None:
    """ValueError for settings the task cannot run with."""
    if config.loss.reconstruction not in RECONSTRUCTIONS:
        raise ValueError(f"loss.reconstruction={config.loss.reconstruction!r}; valid: {RECONSTRUCTIONS}")
    f = 2 ** (len(config.model.block_out_channels) - 1)
    if config.input.image_size % f:
        raise ValueError(f"input.image_size={config.input.image_size} is not divisible by the autoencoder's "
                         f"downsample factor {f}")
    if config.model.in_channels != 3 or config.model.out_channels != 3:
        raise ValueError("the loader gives RGB images: model.in_channels and out_channels must be 3")


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """Mean over elements of KL(N(mean, exp(logvar)) || N(0, 1))."""
    return 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def loss_fn(model: autoencoder_kl.AutoencoderKL, batch: dict[str, jax.Array], rng: jax.Array, *,
            reconstruction: str = "l1", kl_weight: float = 1e-6, sample: bool = True):
    """(loss, metrics) of images batch["image"] [B, H, W, 3] in [-1, 1]."""
    images = batch["image"].astype(jnp.float32)
    mean, logvar = model.encode(images)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape) if sample else mean
    err = model.decode(z) - images
    mse = jnp.mean(jnp.square(err))
    l1 = jnp.mean(jnp.abs(err))
    kl = kl_divergence(mean, logvar)
    loss = (l1 if reconstruction == "l1" else mse) + kl_weight * kl
    return loss, {"l1": l1, "mse": mse, "kl": kl, "latent_std": jnp.std(mean)}


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2)."""
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))


class Evaluator:
    """Reconstruction figures and a grid on the first eval.n_examples held-out images."""

    def __init__(self, config: ml_collections.ConfigDict, mesh):
        self.config, self.mesh = config, mesh
        data = ml_collections.ConfigDict(config.data.to_dict())
        data.split = config.eval.split
        if data.source == "tfds":
            data.tfds_split = config.eval.split
        source = sources.make_source(data)
        n = min(int(config.eval.n_examples), len(source))
        dp = sharding.data_parallel_size(mesh)
        self.batch_size = -(-int(config.eval.batch_size) // dp) * dp  # whole rows per device
        self.images = np.stack([pipeline.model_image(source[i]["image"], config.input.image_size) for i in range(n)])
        self._step = None

    def _reconstruct(self, model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._step is None:
            graphdef = nnx.graphdef(model)

            @jax.jit
            def step(state, x):
                m = nnx.merge(graphdef, state)
                mean, logvar = m.encode(x)
                return m.decode(mean), mean, logvar

            self._step = step
        bs, n = self.batch_size, len(images)
        padded = np.concatenate([images, np.repeat(images[-1:], -n % bs, axis=0)])
        outs = []
        for start in range(0, len(padded), bs):
            batch = sharding.replicated_to_global({"image": padded[start:start + bs]}, self.mesh)
            outs.append(sharding.to_host(self._step(nnx.state(model), batch["image"])))
        return tuple(np.concatenate(parts)[:n] for parts in zip(*outs))

    def __call__(self, model, step: int) -> dict[str, Any]:
        del step
        recon, mean, logvar = self._reconstruct(model, self.images)
        err = recon - self.images
        mse = float(np.mean(np.square(err)))
        std = float(np.std(mean))
        scalars = {"l1": float(np.mean(np.abs(err))), "mse": mse, "psnr": psnr(mse),
                   "kl": float(kl_divergence(jnp.asarray(mean), jnp.asarray(logvar))), "latent_std": std,
                   "suggested_scaling_factor": 1.0 / max(std, 1e-12), "n_examples": len(self.images)}
        k = min(int(self.config.eval.n_grid), len(self.images))
        pairs = np.stack([self.images[:k], np.clip(recon[:k], -1, 1)], axis=1).reshape(2 * k, *self.images.shape[1:])
        grid = metrics.image_grid(np.round((pairs + 1) * 127.5).astype(np.uint8), cols=2)
        return {"scalars": scalars, "images": {"reconstructions": grid}}


def build_task(config: ml_collections.ConfigDict, workdir: str) -> loop.Task:
    """The autoencoder Task: reconstruction + KL on the configured images."""
    del workdir
    check_config(config)
    source = sources.make_source(config.data)
    kw = dict(reconstruction=config.loss.reconstruction, kl_weight=float(config.loss.kl_weight),
              sample=bool(config.loss.sample))
    evaluator = None

    def train_data():
        return pipeline.make_loader_from_config(source, config.input)

    def evaluate(model, step):
        nonlocal evaluator
        if evaluator is None:  # built on first use: it renders and prepares the eval images once
            evaluator = Evaluator(config, sharding.make_mesh(config.mesh))
        return evaluator(model, step)

    return loop.Task(make_model=lambda: autoencoder_kl.create(config.model, rngs=nnx.Rngs(int(config.seed))),
                     loss_fn=lambda model, batch, rng: loss_fn(model, batch, rng, **kw), train_data=train_data,
                     evaluate=evaluate, batch_keys=("image",), examples_per_step=config.input.global_batch_size)
