"""Recaptions a dataset with the SSC and DSC captioners (stage 3 of the recipe).

    python launch/recaption.py --config=configs/recaption.py [--config.output_dir=DIR]
    python launch/recaption.py --config=configs/recaption.py:tiny,ssc=/tmp/ssc,dsc=/tmp/dsc

Rerunning the same command resumes after an interruption (even kill -9) and does nothing once
the job is finished. The last line printed is the summary as JSON; the exit status is 0 when
every shard is committed, 1 otherwise (another process of a multi-process job did not finish),
2 for a missing captioner run or an output directory that holds another job's shards.
See dalle3_jax/recaption/job.py and configs/recaption.py.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dalle3_jax import configlib, distributed, runtime  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recaption config (configs/recaption.py[:variant]).",
                                          lock_config=True)
flags.mark_flags_as_required(["config"])
distributed.define_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.init(distributed_args=distributed.flag_values())
    from dalle3_jax.recaption import job, writer

    try:
        summary = job.run(_CONFIG.value)
    except (FileNotFoundError, writer.JobMismatch) as e:  # a missing run or a mismatched output_dir
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps(summary, sort_keys=True), flush=True)
    return 0 if summary["complete"] else 1


if __name__ == "__main__":
    configlib.check_overrides(sys.argv)
    app.run(main)
