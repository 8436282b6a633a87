"""Stage 3: recaption the dataset with the short (SSC) and descriptive (DSC) captioners.

    python launch/recaption.py --config=configs/recaption.py
    python launch/recaption.py --config=configs/recaption.py:tiny,ssc=/tmp/ssc,dsc=/tmp/dsc --config.output_dir=/tmp/recaptioned
    python launch/recaption.py --config=configs/recaption.py:data=prepared:data/prepared,out=data/recaptioned,ssc=workdirs/ssc_real,dsc=workdirs/dsc_real
    python launch/recaption.py --config=configs/recaption.py:data=tfds:coco_captions,out=data/coco_recaptioned

Writes ArrayRecord shards whose records carry the new `ssc` and `dsc` captions (train on them
with data.source=arrayrecord, data.arrayrecord_pattern=OUTPUT_DIR and input.caption_field=dsc),
plus manifest.json, failures.jsonl and summary.json. Rerunning the same command resumes: shards
already committed are skipped, and a finished job does nothing.

Variants: `tiny` (64 world images, small shards: seconds), `ssc=DIR` and `dsc=DIR` (captioner
run directories; "none" leaves that caption out), `n=N` (recaption only the first N inputs),
`out=DIR` (the output directory), `single_object` and `image_size=N` (the world slice: one object
per scene, render size; images are resized to each captioner's input size),
`data=world|prepared:DIR|tfds:NAME` (the images to recaption: the world's train split, the shards
of launch/prepare.py, or a TFDS dataset such as coco_captions, whose train+restval splits are read;
every record keeps its own caption as `alt`; see dalle3_jax/data/presets.py).
"""

from dalle3_jax import configlib
from dalle3_jax.data import presets
from dalle3_jax.recaption import job


def get_config(arg=None):
    arg = configlib.parse_arg(arg, tiny=False, ssc="", dsc="", n=0, out="", single_object=False, image_size=0,
                              data="world")
    c = job.default_config()  # every field is documented in dalle3_jax/recaption/job.py
    if arg.tiny:
        c.limit = 64  # the first 64 images of the world's train split
        c.records_per_shard = 32  # two shards, so resumption has something to skip
        c.batch_size = 16  # a multiple of 8, so 8 virtual CPU devices each decode whole images
        c.read_threads = 2
        c.log_every = 1
        c.output_dir = "workdirs/recaption_tiny"
        # The tiny captioner runs, e.g. launch/train.py --config=configs/captioner_short.py:tiny,init_from=none
        c.captioners.ssc.workdir = "workdirs/captioner_short_tiny"
        c.captioners.dsc.workdir = "workdirs/captioner_descriptive_tiny"
    for name in ("ssc", "dsc"):
        if arg[name]:
            c.captioners[name].workdir = "" if arg[name] == "none" else arg[name]
    if arg.n:
        c.limit = arg.n
    if arg.out:
        c.output_dir = arg.out
    # The world slice to recaption (the T2I run that reads the output must use the same one).
    if arg.single_object:
        c.data.world.single_object = True
    if arg.image_size:
        c.data.world.image_size = arg.image_size
    presets.apply(c, arg.data, role="recaption")  # real data: the images to recaption
    return c
