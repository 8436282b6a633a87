"""Stage 4: text-to-image diffusion on blended captions (pixel-space UNet, T5-style text encoder).

    python launch/train.py --config=configs/t2i.py:caption=descriptive_gt --workdir=workdirs/t2i_oracle
    python launch/train.py --config=configs/t2i.py:caption=dsc,blend=0.95,records=workdirs/recaption
    python launch/train.py --config=configs/t2i.py:caption=alt --workdir=workdirs/t2i_alt
    python launch/train.py --config=configs/t2i.py:tiny --workdir=/tmp/t2i_tiny
    python launch/train.py --config=configs/t2i.py:data=prepared:data/prepared,caption=alt --workdir=workdirs/t2i_real_alt
    python launch/train.py --config=configs/t2i.py:data=prepared:data/prepared,caption=dsc,records=data/recaptioned
    python launch/sample.py --workdir=workdirs/t2i_oracle --prompt "a small red circle at the top left" --out grid.png
    python -m dalle3_jax.evals.prompt_following --workdir=workdirs/t2i_oracle --json

Variants (after the colon, comma-separated):
  caption=alt|ssc|dsc|descriptive_gt  which caption trains the model: the alt text only, the
        short or descriptive synthetic captions of the recaption job (blended with alt), or the
        oracle: the world's true descriptive captions (blended with alt)
  blend=0.95      probability of the chosen caption per example (ignored for caption=alt)
  records=DIR     the recaption job's output (ArrayRecord shards), read for caption=ssc|dsc; for
                  one-object scenes recaption with --config.data.world.single_object=True
  single_object   one object per scene (default true; single_object=false for 1-4 groups)
  image_size=N    training resolution in pixels (default: 32 on the world, which renders at this
                  size; 64 on real data, 256 on real data with autoencoder=)
  data=world      the training images: world | prepared:DIR (launch/prepare.py output; caption=alt
                  trains on its captions) | tfds:NAME (e.g. tfds:coco_captions). Real data turns
                  prompt following off and validates on the training source (data/presets.py)
  autoencoder=    latent diffusion through a frozen autoencoder: a models/autoencoder_kl.py variant
                  (autoencoder=tiny: 128 px -> 32 x 32 x 4 latents, random weights unless
                  --config.autoencoder.checkpoint=RUN) or a diffusers AutoencoderKL directory
                  (autoencoder=/path/to/vae); the UNet's side and channels follow its latents
  latents=DIR     with autoencoder=: train on the latents that launch/precompute_latents.py
                  cached in DIR (same config) instead of encoding every batch
  text_states=DIR with --config.model.text_pretrained=T5: train on the frozen encoder's states
                  that launch/precompute_latents.py --text_states cached in DIR (same config)
                  instead of running the encoder every step; with latents=, the same DIR
  model=S         architecture size (tiny | S | B, see models/t2i.py)
  steps=N         total optimizer steps (0 = the default, 1200: the issue's prototype trained
                  that many in 20 minutes on an idle 2-core CPU)
  tiny            a seconds-long smoke run (tests)

The default recipe is what worked on this 2-core machine (see trainers/t2i.py and the issue):
32 px, one object, a ~1.2M-parameter UNet (channels 16/32/64, attention at 16, 8 and the
bottleneck), batch 128, v prediction on a cosine schedule with zero terminal SNR, loss weight
(min(SNR, 5) + 1) / (SNR + 1), lr 2e-3 after 100 warm-up steps, EMA with a warm-up decay, and
DDIM with 25 steps and guidance 3 for evaluation. Any field can be overridden with
--config.field=value; --config.compute_dtype=bfloat16 runs the text encoder and the UNet in
bfloat16 with float32 master weights, EMA and losses.
"""

import os

from dalle3_jax import configlib
from dalle3_jax.data import blend, presets
from dalle3_jax.diffusion import latent
from dalle3_jax.trainers import t2i


def get_config(arg=None):
    arg = configlib.parse_arg(arg, tiny=False, caption="descriptive_gt", blend=0.95, records="workdirs/recaption",
                              single_object=True, image_size=0, model="S", steps=0, data="world",
                              autoencoder="", latents="", text_states="")
    if arg.caption not in blend.CHOICES:
        raise ValueError(f"caption={arg.caption!r}; valid: {', '.join(blend.CHOICES)}")
    c = t2i.default_config(smoke=arg.tiny, model_variant="tiny" if arg.tiny else arg.model)
    c.caption = arg.caption  # which caption trains the model (data/blend.py CHOICES)
    c.blend = arg.blend
    if arg.caption in ("ssc", "dsc"):
        # Synthetic captions live in the recaption job's records (every record keeps its alt text).
        c.data.source = "arrayrecord"
        c.data.arrayrecord_pattern = arg.records
    c.data.world.single_object = arg.single_object  # world data and prompt-following prompts
    # The world renders at >= 32 px (coarser renders defeat the scene parser); the pipeline resizes.
    c.data.world.image_size = max(arg.image_size or 32, 32)
    c.input.image_size = arg.image_size or 32
    c.model.unet.image_size = arg.image_size or 32
    # Token lengths incl. bos/eos: one-object descriptive captions <= 29, any descriptive <= 76.
    c.input.max_text_len = 32 if arg.single_object else 80
    if arg.steps:
        c.total_steps = arg.steps
    # Real data: its source, image size and evals (before the autoencoder sizes the latents).
    presets.apply(c, arg.data, role="t2i", image_size=arg.image_size, latent=bool(arg.autoencoder))
    if arg.autoencoder:
        # A path names a diffusers directory to import; a bare name a registry variant.
        field = "pretrained" if os.sep in arg.autoencoder or os.path.isdir(arg.autoencoder) else "variant"
        c.autoencoder[field] = arg.autoencoder
        latent.configure(c)  # UNet side and channels from the latents; no clipping to [-1, 1]
    if arg.latents:
        if not arg.autoencoder:
            raise ValueError("latents=DIR needs autoencoder=... (the one the cache was made with)")
        c.data.source = "arrayrecord"  # the cache keeps every record whole, captions included
        c.data.arrayrecord_pattern = arg.latents
        c.autoencoder.use_cached = True
    if arg.text_states:
        if arg.latents and os.path.abspath(arg.latents) != os.path.abspath(arg.text_states):
            raise ValueError(f"latents={arg.latents} and text_states={arg.text_states} must name the same cache "
                             "(one record holds both)")
        c.data.source = "arrayrecord"  # the cache keeps every record whole
        c.data.arrayrecord_pattern = arg.text_states
        c.cached_text_states = True
    return c
