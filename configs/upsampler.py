"""Stage 6: the learned prompt upsampler, a small text model turning a short prompt into a
descriptive one, trained on (short caption, descriptive caption) pairs of the same images.

    python launch/train.py --config=configs/upsampler.py --workdir=workdirs/upsampler
    python launch/train.py --config=configs/upsampler.py:records=workdirs/recaption --workdir=workdirs/upsampler_dsc
    python launch/train.py --config=configs/upsampler.py:single_object=false --workdir=workdirs/upsampler_multi
    python launch/train.py --config=configs/upsampler.py:tiny --workdir=/tmp/upsampler_tiny
    python launch/sample.py --workdir=workdirs/t2i_oracle --prompt "a green star" --upsample=learned \\
        --upsampler_workdir=workdirs/upsampler

Variants (after the colon, comma-separated):
  records=DIR     the recaption job's output (ArrayRecord shards whose records carry `ssc` and
                  `dsc`): trains on (SSC caption, DSC caption) pairs, the paper's recipe. Without
                  it: the world's `finetune` split ground truths (`short` -> `descriptive`).
  single_object   one object per scene (default true, the quick pipeline's slice; descriptions up
                  to 32 tokens); single_object=false: 1-4 groups, descriptions up to 80 tokens.
                  Sets the world of the ground-truth pairs and of the held-out eval prompts; with
                  records=DIR it must match how those records were made.
  model=S         architecture size (tiny | S | B, see models/upsampler.py)
  steps=N         total optimizer steps (0 = the default, 600)
  tiny            a seconds-long smoke run (tests)

Evals (every eval_every steps and at the end): validation loss and token accuracy; on held-out
short prompts (the world's eval split) the fraction of upsampled prompts that keep the prompt's
facts (`keeps_facts`, and per kind `keeps_shape`, `keeps_colour`, `keeps_count`), the facts they
add (`facts_added`), the fraction describing a complete scene (`complete`) and example upsamples.
Any field can be overridden with --config.field=value (decoding: --config.sample.method=greedy).
"""

from dalle3_jax import configlib
from dalle3_jax.trainers import upsampler


def get_config(arg=None):
    arg = configlib.parse_arg(arg, tiny=False, records="", single_object=True, model="S", steps=0)
    c = upsampler.default_config(smoke=arg.tiny, model_variant="tiny" if arg.tiny else arg.model)
    if arg.records:
        c.data.records = arg.records  # the recaption job's output directory (or a glob of shards)
        c.data.source_caption = "ssc"
        c.data.target_caption = "dsc"
    c.data.world.single_object = arg.single_object  # ground-truth pairs and held-out prompts
    # Token lengths incl. bos/eos: one-object descriptions <= 29, any description <= 76.
    c.model.max_target_len = 32 if arg.single_object else 80
    if arg.steps:
        c.total_steps = arg.steps
    return c
