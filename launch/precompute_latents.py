"""Precomputes a T2I run's latents (and text-encoder states) once: its records plus `latent`, as ArrayRecord shards.

    python launch/precompute_latents.py --config=configs/t2i.py:image_size=128,autoencoder=tiny \\
        --config.autoencoder.checkpoint=workdirs/autoencoder --out=workdirs/latents_128
    python launch/train.py --config=configs/t2i.py:image_size=128,autoencoder=tiny,latents=workdirs/latents_128 \\
        --config.autoencoder.checkpoint=workdirs/autoencoder

With --text_states (a config with a frozen pretrained text encoder, model.text_pretrained), each
record also stores the encoder's states of every caption the run's blending can pick; without an
autoencoder the cache holds those alone (train with text_states=DIR):

    python launch/precompute_latents.py --config=configs/t2i.py:caption=dsc,records=workdirs/recaption \\
        --config.model.text_pretrained=/ckpt/flan-t5-base --text_states --out=workdirs/text_cache
    python launch/train.py --config=configs/t2i.py:caption=dsc,text_states=workdirs/text_cache \\
        --config.model.text_pretrained=/ckpt/flan-t5-base

The config is the training run's (the same variant and overrides, without latents=): its data,
input.image_size and autoencoder block decide what is encoded and how (and for text states its
text encoder, tokenizer, max_text_len, caption and blend). Rerunning the same command
finishes an interrupted job (committed shards are kept); another config into the same --out is
refused. See dalle3_jax/diffusion/latent_cache.py for the layout.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dalle3_jax import configlib, distributed, runtime  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "The T2I training config (configs/t2i.py[:variant]).",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Output directory of the latent cache.")
_SHARDS = flags.DEFINE_integer("num_shards", 1, "Output shards (input range k -> shard k).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images encoded per batch (rounded to the data-parallel size).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Stored latent (and text state) dtype.")
_TEXT = flags.DEFINE_bool("text_states", False, "Also store the frozen text encoder's states of every caption "
                          "the run's blending can pick (needs model.text_pretrained).")
flags.mark_flags_as_required(["config", "out"])
distributed.define_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.init(distributed_args=distributed.flag_values())
    from dalle3_jax.diffusion import latent_cache

    config = _CONFIG.value
    if config.autoencoder.use_cached or config.get("cached_text_states"):
        raise app.UsageError("give the training config without latents= or text_states= (the cache is being "
                             "made from it)")
    manifest = latent_cache.precompute(config, _OUT.value, num_shards=_SHARDS.value, batch_size=_BATCH.value,
                                       dtype=_DTYPE.value, text_states=_TEXT.value)
    if distributed.is_primary():
        print(json.dumps({k: manifest[k] for k in ("inputs", "written", "failed", "num_shards")}), flush=True)


if __name__ == "__main__":
    configlib.check_overrides(sys.argv)
    app.run(main)
