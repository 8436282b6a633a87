"""Latent diffusion: a frozen autoencoder between the data's pixels and the space the UNet denoises.

`config.autoencoder` (`default_config`) picks the space of a T2I run:
  pixel space   pretrained = "" and variant = "" (the default): the UNet denoises the images
  pretrained    a diffusers AutoencoderKL directory, imported by weights/vae.py
  variant       models/autoencoder_kl.py at a registry variant ("tiny", ...), its weights read
                from `checkpoint` (a run directory or its checkpoints/ folder, "DIR" or
                "DIR:STEP", the model under `model`) or, with checkpoint "", random (seed)

    images [B, S, S, 3] in [-1, 1] --encode--> mean, logvar [B, S/f, S/f, C]
        z = mean, or mean + exp(logvar / 2) * noise with the noise fixed per example (`sample`)
        latent = (z - shift) * scale                       what the UNet learns to denoise
    sampled latents [B, S/f, S/f, C] --decode(latent / scale + shift)--> images [B, S, S, 3]

The autoencoder is frozen and never part of the train state (not differentiated, not
checkpointed with the run): it is built or imported once per process and mesh (`get`), and its
weights enter its jitted programs as arguments, never as compiled-in constants. Training encodes
each batch on the devices in a program of its own before the train step (`prepare_batch`, the
loop's Task.prepare_batch), or reads latents that launch/precompute_latents.py stored in the
records (`use_cached`). Sampling decodes after the last sampler step (`decode_samples`), so every
caller of the samplers still receives images at the pixel size.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dalle3_jax import sharding

# Record field of cached latents (launch/precompute_latents.py) and the batch key of latents.
LATENT_KEY = "latent"


def default_config() -> ml_collections.ConfigDict:
    """The `autoencoder` block of a T2I config; the defaults keep the run in pixel space."""
    c = ml_collections.ConfigDict()
    c.pretrained = ""  # a diffusers AutoencoderKL directory (config.json + safetensors); "" = none
    c.variant = ""  # or a models/autoencoder_kl.py variant ("tiny": 128 px -> 32 x 32 x 4); "" = none
    c.checkpoint = ""  # the variant's weights: "DIR" or "DIR:STEP" of a run; "" = random (seed)
    c.seed = 0  # random weights of a variant without checkpoint; the posterior noise of `sample`
    # Latents are (z - shift) * scale; 0 keeps the autoencoder's own scale. A trained run's
    # `suggested_scaling_factor` (trainers/autoencoder.py) gives its latents unit variance.
    c.scaling_factor = 0.0
    c.sample = False  # encode to a posterior sample (fixed per example) instead of the mean
    c.use_cached = False  # read `latent` from the records (launch/precompute_latents.py)
    return c


def settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
    """The autoencoder block of a run config, or None in pixel space (also for runs saved before
    the block existed)."""
    ae = config.get("autoencoder")
    if ae is None or not (ae.get("pretrained") or ae.get("variant")):
        return None
    return ae


def geometry(ae: ml_collections.ConfigDict) -> tuple[int, int]:
    """(downsampling factor f, latent channels C) of an autoencoder block, without its weights."""
    if ae.pretrained and ae.variant:
        raise ValueError(f"autoencoder.pretrained={ae.pretrained!r} and autoencoder.variant={ae.variant!r} are "
                         "both set; give one (a diffusers directory, or a registry variant)")
    if ae.pretrained:
        path = os.path.join(ae.pretrained, "config.json")
        if not os.path.isfile(path):  # a whole diffusers pipeline keeps its VAE in vae/
            path = os.path.join(ae.pretrained, "vae", "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"autoencoder.pretrained: {ae.pretrained}/config.json not found (expected a "
                                    "diffusers AutoencoderKL directory written by save_pretrained)")
        with open(path, encoding="utf-8") as f:
            fields = json.load(f)
    else:
        from dalle3_jax.models import autoencoder_kl

        fields = autoencoder_kl.config(ae.variant)
    # Both layouts name the sizes alike: one halving per block after the first.
    return 2 ** (len(fields["block_out_channels"]) - 1), int(fields["latent_channels"])


def configure(config: ml_collections.ConfigDict) -> None:
    """Fits a T2I config to its autoencoder block (in place): the UNet's input side and channels
    become the latent's, and predicted clean latents are not clipped to the pixel range."""
    ae = settings(config)
    if ae is None:
        return
    factor, channels = geometry(ae)
    config.model.unet.image_size = config.input.image_size // factor
    config.model.unet.in_channels = channels
    config.sample.clip_x0 = False


def check(config: ml_collections.ConfigDict) -> None:
    """Clear errors for a UNet whose input does not match the data's (pixels or latents)."""
    ae = settings(config)
    unet, size = config.model.unet, int(config.input.image_size)
    if ae is None:
        if size != unet.image_size:
            raise ValueError(f"input.image_size={size} differs from model.unet.image_size={unet.image_size}")
        if config.get("autoencoder") and config.autoencoder.use_cached:
            raise ValueError("autoencoder.use_cached needs an autoencoder (autoencoder.pretrained or .variant)")
        return
    factor, channels = geometry(ae)
    if size % factor:
        raise ValueError(f"input.image_size={size} is not divisible by the autoencoder's factor {factor}")
    if (unet.image_size, unet.in_channels) != (size // factor, channels):
        raise ValueError(f"the autoencoder turns {size} px images into {size // factor} x {size // factor} x "
                         f"{channels} latents, but model.unet has image_size={unet.image_size}, "
                         f"in_channels={unet.in_channels}: set --config.model.unet.image_size={size // factor} "
                         f"--config.model.unet.in_channels={channels} (configs/t2i.py:autoencoder=... does)")
    if config.sample.clip_x0:
        raise ValueError("sample.clip_x0 clips predicted samples to the pixel range [-1, 1], which latents are "
                         "not in: set sample.clip_x0=False for latent diffusion")
    if ae.use_cached:
        from dalle3_jax.diffusion import latent_cache

        latent_cache.check_job(config)


def batch_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The host batch keys a T2I train step needs sent to the devices."""
    ae = settings(config)
    if ae is None:
        return ("image", "tokens")
    return (LATENT_KEY, "tokens") if ae.use_cached else ("image", "tokens", "index")


def input_key(config: ml_collections.ConfigDict) -> str:
    """The batch key of what the UNet denoises after `prepare_batch`: "image" or "latent"."""
    return "image" if settings(config) is None else LATENT_KEY


@functools.partial(jax.jit, static_argnames=("graphdef", "sample"))
def _encode(graphdef, state, images, index, seed, *, sample: bool):
    model = nnx.merge(graphdef, state)
    mean, logvar = model.encode(images)
    z = mean.astype(jnp.float32)
    if sample:
        # Noise from (seed, example index): an example gets the same latent in every epoch, in a
        # resumed run and in the cache, however the batches are cut.
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(index)
        noise = jax.vmap(lambda k: jax.random.normal(k, z.shape[1:], jnp.float32))(keys)
        z = z + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise
    return (z - (model.shift_factor or 0.0)) * model.scaling_factor


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode(graphdef, state, latents):
    model = nnx.merge(graphdef, state)
    return model.images_from_latents(latents).astype(jnp.float32)


class Autoencoder:
    """A frozen autoencoder on a mesh: jitted `encode` (images -> scaled latents) and `decode`."""

    def __init__(self, model: nnx.Module, ae: ml_collections.ConfigDict, mesh):
        if ae.get("scaling_factor"):
            model.scaling_factor = float(ae.scaling_factor)  # a Python attribute: part of the graphdef
        self.graphdef, self.state = nnx.split(model)
        self.mesh, self.sample, self.seed = mesh, bool(ae.sample), int(ae.seed)
        self.factor, self.channels = int(model.downsample_factor), int(model.latent_channels)

    def encode(self, images: jax.Array, index: jax.Array | None = None) -> jax.Array:
        """images [B, S, S, 3] in [-1, 1] -> latents [B, S/f, S/f, C] (index [B]: example ids,
        needed when sampling the posterior)."""
        if self.sample and index is None:
            raise ValueError("autoencoder.sample draws each example's latent from its index: pass index")
        index = jnp.zeros(images.shape[:1], jnp.int32) if index is None else index
        return _encode(self.graphdef, self.state, images, index, self.seed, sample=self.sample)

    def decode(self, latents: jax.Array) -> jax.Array:
        """latents [B, S/f, S/f, C] -> images [B, S, S, 3], about [-1, 1] (not clipped)."""
        return _decode(self.graphdef, self.state, latents)

    def encode_host(self, images: np.ndarray, index: np.ndarray, batch_size: int) -> np.ndarray:
        """Whole-array encoding for sets every process holds (validation, the latent cache):
        float32 [N, S, S, 3] -> float32 [N, S/f, S/f, C], in batches of `batch_size`."""
        dp = sharding.data_parallel_size(self.mesh)
        bs = max(dp, batch_size // dp * dp)
        out = []
        for start in range(0, len(images), bs):
            part, ids = images[start:start + bs], np.asarray(index[start:start + bs], np.int32)
            pad = bs - len(part)  # a short last batch repeats its last row (one compiled shape)
            batch = sharding.replicated_to_global({"image": np.concatenate([part, np.repeat(part[-1:], pad, 0)]),
                                                   "index": np.concatenate([ids, np.repeat(ids[-1:], pad)])},
                                                  self.mesh)
            with jax.set_mesh(self.mesh):
                z = self.encode(batch["image"], batch["index"])
            out.append(np.asarray(sharding.to_host(z), np.float32)[:len(part)])
        return np.concatenate(out)


def build(ae: ml_collections.ConfigDict, mesh) -> nnx.Module:
    """The autoencoder model of block `ae` on `mesh` (imported, restored or randomly initialised)."""
    geometry(ae)  # the pretrained/variant choice and the directory are checked first
    if ae.pretrained:
        from dalle3_jax.weights import vae

        model, _ = vae.load_autoencoder_kl(ae.pretrained, mesh=mesh)
        return model
    from dalle3_jax import checkpoint
    from dalle3_jax.models import autoencoder_kl

    def ctor():
        return autoencoder_kl.create(autoencoder_kl.config(ae.variant), rngs=nnx.Rngs(int(ae.seed)))

    if not ae.checkpoint:
        return sharding.create_sharded(ctor, mesh)
    directory, step = checkpoint.parse_init_from(ae.checkpoint)
    if os.path.isdir(os.path.join(directory, "checkpoints")):
        directory = os.path.join(directory, "checkpoints")
    # The checkpoint supplies every value: an abstract model is the restore target.
    graphdef, abstract = sharding.abstract_state(ctor, mesh)
    model = nnx.merge(graphdef, abstract)
    with jax.set_mesh(mesh):
        checkpoint.load_model_weights(directory, model, step=step, prefix="model")
    return model


_LOADED: dict[tuple, Autoencoder] = {}


def get(ae: ml_collections.ConfigDict, mesh) -> Autoencoder:
    """The autoencoder of block `ae` on `mesh`, built on first use and then reused: training,
    evaluation and sampling in one process share one copy of the weights."""
    key = (json.dumps(ae.to_dict(), sort_keys=True), mesh)
    if key not in _LOADED:
        if len(_LOADED) >= 2:  # a process rarely needs more than one; do not hoard weights
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = Autoencoder(build(ae, mesh), ae, mesh)
    return _LOADED[key]


def uses_cache(config: ml_collections.ConfigDict) -> bool:
    """Whether the run reads precomputed latents from its records (autoencoder.use_cached)."""
    ae = settings(config)
    return ae is not None and bool(ae.use_cached)


def _check_cached(config: ml_collections.ConfigDict) -> Callable[[Mapping[str, jax.Array]], Mapping]:
    unet = config.model.unet
    want = (unet.image_size, unet.image_size, unet.in_channels)

    def check_shape(batch: Mapping[str, jax.Array]) -> Mapping[str, jax.Array]:
        got = tuple(batch[LATENT_KEY].shape[1:])
        if got != want:  # shapes are static: this costs nothing per step
            raise ValueError(f"cached latents are {got} but the UNet denoises {want}: the records were "
                             "precomputed with another autoencoder or image size; rerun "
                             "launch/precompute_latents.py with this run's config")
        return batch

    return check_shape


def prepare_batch(config: ml_collections.ConfigDict) -> Callable[[Mapping[str, jax.Array]], Mapping] | None:
    """The Task.prepare_batch of a T2I run: device batches' images -> latents with the frozen
    autoencoder (cached latents are only checked against the UNet); None in pixel space."""
    ae = settings(config)
    if ae is None:
        return None
    if ae.use_cached:
        return _check_cached(config)

    loaded: list[Autoencoder] = []  # built at the first batch, inside the loop's mesh

    def prepare(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        if not loaded:
            loaded.append(get(ae, sharding.make_mesh(config.mesh)))
        out = {k: v for k, v in batch.items() if k not in ("image", "index")}
        out[LATENT_KEY] = loaded[0].encode(batch["image"], batch["index"])
        return out

    return prepare


def to_model_space(config: ml_collections.ConfigDict, mesh, images: np.ndarray, index: np.ndarray,
                   batch_size: int) -> np.ndarray:
    """Host images [N, S, S, 3] -> what the UNet denoises: the images themselves in pixel space,
    else their latents [N, S/f, S/f, C] (index [N]: the examples' source indices)."""
    ae = settings(config)
    return images if ae is None else get(ae, mesh).encode_host(images, index, batch_size)


def decode_samples(config: ml_collections.ConfigDict, mesh, samples: jax.Array) -> jax.Array:
    """Sampler output -> images [B, S, S, 3] in about [-1, 1]: decoded latents, or the samples
    themselves in pixel space."""
    ae = settings(config)
    if ae is None:
        return samples
    with jax.set_mesh(mesh):
        return get(ae, mesh).decode(samples)
