"""Stage 5's judge: the evaluation CLIP, a contrastive-only CoCa trained only on the world's
`judge` split with its ground-truth short and descriptive captions (per example one of the two,
descriptive with probability `descriptive_prob`, chosen by a hash of (caption_seed, example id)).
CLIP score (dalle3_jax/evals/clip_score.py) and launch/evaluate.py read it.

    python launch/train.py --config=configs/eval_clip.py --workdir=workdirs/eval_clip
    python launch/train.py --config=configs/eval_clip.py:single_object=false --workdir=workdirs/eval_clip_multi
    python launch/train.py --config=configs/eval_clip.py:tiny --workdir=/tmp/eval_clip_tiny
    python -m dalle3_jax.evals.clip_score --clip_workdir=workdirs/eval_clip --json

Variants (after the colon, comma-separated):
  single_object   one object per scene (default true, as the default T2I recipe; false: 1-4 groups)
  image_size=32   the CLIP's input size: that of the T2I images it will judge (the world renders at
                  >= 32 px and the loader resizes; other sizes are resized when scoring)
  steps=N         total optimizer steps (0 = the default, 1000)
  tiny            a seconds-long smoke run (tests)

Its evals report recall@1 image->text and text->image on the world's eval split (512 scenes) for
short and descriptive captions separately, strict (`.../i2t_r1`) and counting identical texts as
hits (`.../i2t_r1_text`: many scenes share one short caption), and the mean CLIP score of
matching and mismatched pairs. Any field can be overridden with --config.field=value.
"""

from dalle3_jax import configlib
from dalle3_jax.trainers import clip


def get_config(arg=None):
    arg = configlib.parse_arg(arg, tiny=False, single_object=True, image_size=32, steps=0)
    c = clip.default_config(smoke=arg.tiny, image_size=arg.image_size, single_object=arg.single_object)
    if arg.steps:
        c.total_steps = arg.steps
    return c
