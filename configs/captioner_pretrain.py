"""Stage 1: CoCa captioner pretraining on the train split's alt-text (contrastive + captioning).

    python launch/train.py --config=configs/captioner_pretrain.py --workdir=workdirs/captioner_pretrain
    python launch/train.py --config=configs/captioner_pretrain.py:tiny --workdir=/tmp/pretrain_tiny
    python launch/train.py --config=configs/captioner_pretrain.py:data=prepared:data/prepared,model=S --workdir=workdirs/pretrain_real

Variants: `single_object` (one object per scene), `image_size=N` (world and model resolution),
`tiny` (a seconds-long smoke run), `model=S|B|L` (architecture size), `steps=N`,
`data=world|prepared:DIR|tfds:NAME` (real data: launch/prepare.py shards or a TFDS dataset such
as coco_captions; 224 px unless `image_size=N`, evals on the held-out split: validation loss
and retrieval, since fact precision needs the world's scenes; see dalle3_jax/data/presets.py).
Add `--config.compute_dtype=bfloat16` for bfloat16 compute with float32 master weights.
"""

from dalle3_jax import configlib
from dalle3_jax.data import presets
from dalle3_jax.trainers import captioner


def get_config(arg=None):
    arg = configlib.parse_arg(arg, tiny=False, model="tiny", steps=0, single_object=False, image_size=0, data="world")
    c = captioner.default_config(smoke=arg.tiny, model_variant=arg.model)
    c.data.split = "train"  # the large split; the recipe only uses its alt text
    c.input.caption_field = "alt"  # web-like alt text: noisy, short, often wrong
    c.input.max_text_len = min(c.input.max_text_len, 16)  # alt texts are <= 10 tokens
    c.loss.w_con = 1.0  # the contrastive branch gives the image tower its first semantics
    c.loss.w_cap = 2.0
    if not arg.tiny:
        c.total_steps = 2000  # 128k alt-text examples at batch 64
        c.log_every = 100
        c.eval_every = 1000
        c.checkpoint_every = 500
    if arg.steps:
        c.total_steps = arg.steps
    captioner.apply_world_variant(c, arg)
    presets.apply(c, arg.data, role="captioner", image_size=arg.image_size)  # real data
    return c
