"""Stage 4: text-to-image diffusion on blended captions (pixel-space UNet, T5-style text encoder).

    python launch/train.py --config=configs/t2i.py:caption=descriptive_gt --workdir=workdirs/t2i_oracle
    python launch/train.py --config=configs/t2i.py:caption=dsc,blend=0.95,records=workdirs/recaption
    python launch/train.py --config=configs/t2i.py:caption=alt --workdir=workdirs/t2i_alt
    python launch/train.py --config=configs/t2i.py:tiny --workdir=/tmp/t2i_tiny
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
  image_size=32   training resolution (the world renders at this size)
  model=S         architecture size (tiny | S | B, see models/t2i.py)
  steps=N         total optimizer steps (0 = the default, 1200: the issue's prototype trained
                  that many in 20 minutes on an idle 2-core CPU)
  tiny            a seconds-long smoke run (tests)

The default recipe is what worked on this 2-core machine (see trainers/t2i.py and the issue):
32 px, one object, a ~1.2M-parameter UNet (channels 16/32/64, attention at 16, 8 and the
bottleneck), batch 128, v prediction on a cosine schedule with zero terminal SNR, loss weight
(min(SNR, 5) + 1) / (SNR + 1), lr 2e-3 after 100 warm-up steps, EMA with a warm-up decay, and
DDIM with 25 steps and guidance 3 for evaluation. Any field can be overridden with
--config.field=value.
"""

from dalle3_jax import configlib
from dalle3_jax.data import blend
from dalle3_jax.trainers import t2i


def get_config(arg=None):
    arg = configlib.parse_arg(arg, tiny=False, caption="descriptive_gt", blend=0.95, records="workdirs/recaption",
                              single_object=True, image_size=32, model="S", steps=0)
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
    c.data.world.image_size = max(arg.image_size, 32)
    c.input.image_size = arg.image_size
    c.model.unet.image_size = arg.image_size
    # Token lengths incl. bos/eos: one-object descriptive captions <= 29, any descriptive <= 76.
    c.input.max_text_len = 32 if arg.single_object else 80
    if arg.steps:
        c.total_steps = arg.steps
    return c
