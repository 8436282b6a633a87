"""One process of the 2-process job that tests/test_distributed.py starts on loopback.

    DALLE3_JAX_COORDINATOR=localhost:PORT DALLE3_JAX_NUM_PROCESSES=2 DALLE3_JAX_PROCESS_ID=P \
        python tests/multiprocess_worker.py OUTDIR

Joins the job the way every launch script does (runtime.init), then trains the tiny captioner
(with its end-of-run evaluation, whose decoding and retrieval gather arrays across processes)
and the tiny T2I model in OUTDIR/captioner and OUTDIR/t2i, recording each process's examples
per step. The test compares the losses, the evaluation and the examples with single-process runs
of the same configs (config_for below).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dalle3_jax import configlib, runtime, trainers  # noqa: E402
from dalle3_jax.trainers import loop  # noqa: E402

# The runs the test compares: 6 tiny steps, a loss row per step; T2I as conftest's tiny_t2i_run.
CONFIGS = {"captioner": "captioner_pretrain.py:tiny", "t2i": "t2i.py:tiny"}
# Across the 2 processes the T2I model is sharded FSDP (its parameters split over both hosts'
# devices); tests/test_t2i.py covers the other strategies on one process.
STRATEGY = {"captioner": "dp", "t2i": "fsdp"}


def config_for(name: str):
    config = configlib.load_config_file(os.path.join(ROOT, "configs", CONFIGS[name]))
    config.total_steps, config.log_every, config.checkpoint_every = 6, 1, 100
    return config


def main(outdir: str) -> None:
    runtime.init()  # jax.distributed from the DALLE3_JAX_* variables, before any device use
    for name in CONFIGS:
        config = config_for(name)
        config.record_examples = True
        config.mesh.strategy = STRATEGY[name]
        workdir = os.path.join(outdir, name)
        task = trainers.build_task(config, workdir)
        if name == "t2i":
            task.evaluate = None  # sampling programs compile slowly; the captioner's eval covers gathers
        loop.train_and_evaluate(config, workdir, task)


if __name__ == "__main__":
    main(sys.argv[1])
