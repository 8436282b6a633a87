"""Trains any stage of the recipe; the config's `trainer` field picks the stage.

    python launch/train.py --config=configs/captioner_pretrain.py [--config.total_steps=100] [--workdir=DIR]
    python launch/train.py --config=configs/captioner_descriptive.py:tiny --workdir=/tmp/dsc
    python launch/train.py --config=configs/t2i.py:caption=dsc,blend=0.95

Rerunning the same command resumes from the workdir's latest checkpoint; a finished run does
nothing. The config is saved as DIR/config.json and in every checkpoint.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dalle3_jax import configlib, distributed, runtime, trainers  # noqa: E402
from dalle3_jax.trainers import loop  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; default workdirs/<config file name>.")
flags.mark_flags_as_required(["config"])
distributed.define_flags()


def default_workdir(config_path: str) -> str:
    name, _, variant = os.path.basename(config_path).partition(":")
    name = os.path.splitext(name)[0] + (f"_{variant.replace(',', '_').replace('=', '-')}" if variant else "")
    return os.path.join("workdirs", name)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.init(distributed_args=distributed.flag_values())
    config = _CONFIG.value
    workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
    task = trainers.build_task(config, workdir)
    result = loop.train_and_evaluate(config, workdir, task)
    if distributed.is_primary():
        print({k: v for k, v in result.items()}, flush=True)
    if result["step"] < config.total_steps:
        # Stopped by SIGTERM/SIGINT after checkpointing: a non-zero status (128 + SIGTERM, as a
        # killed process reports) tells callers such as launch/pipeline.py the run is not finished.
        sys.exit(143)


if __name__ == "__main__":
    configlib.check_overrides(sys.argv)
    app.run(main)
