"""The latent-diffusion autoencoder (models/autoencoder_kl.py) trained from scratch on images, for
latent T2I without a pretrained VAE (dalle3_jax/trainers/autoencoder.py): reconstruction (L1 by
default) of a posterior sample plus a small KL term.

    python launch/train.py --config=configs/autoencoder.py --workdir=workdirs/autoencoder
    python launch/train.py --config=configs/autoencoder.py:image_size=64 --workdir=workdirs/autoencoder_64
    python launch/train.py --config=configs/autoencoder.py:tiny --workdir=/tmp/autoencoder_tiny
    python launch/train.py --config=configs/t2i.py --config.autoencoder.variant=tiny \
        --config.autoencoder.checkpoint=workdirs/autoencoder ...   # latent T2I through it

Variants (after the colon, comma-separated):
  variant=tiny    the models/autoencoder_kl.py size (tiny: f = 4, 128 px -> 32 x 32 x 4; sd: f = 8)
  image_size=128  training image side (the world renders it; other sources are resized)
  steps=N         total optimizer steps (0 = the default, 5000)
  tiny            a seconds-long smoke run (tests)

Its evals report L1, MSE and PSNR of reconstructions of the world's eval split, the KL, the
latents' standard deviation with the scaling_factor that would make them unit variance, and a
grid of (original, reconstruction) pairs. Images come from `data` like any stage (set
--config.data.source=arrayrecord and --config.data.arrayrecord_pattern for prepared shards).
"""

from dalle3_jax import configlib
from dalle3_jax.trainers import autoencoder


def get_config(arg=None):
    arg = configlib.parse_arg(arg, tiny=False, variant="tiny", image_size=128, steps=0)
    c = autoencoder.default_config(smoke=arg.tiny, variant=arg.variant, image_size=arg.image_size)
    if arg.steps:
        c.total_steps = arg.steps
    return c
