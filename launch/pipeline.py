"""Runs the whole recipe on the synthetic world and writes report.md with its plots.

    python launch/pipeline.py                                    # quick (default), < 20 min on 2 CPU cores
    python launch/pipeline.py --config=configs/pipeline.py:full  # the faithful experiment
    python launch/pipeline.py --config=configs/pipeline.py:tiny --workdir=/tmp/pipeline_tiny --json

Stages (configs/pipeline.py, dalle3_jax/recipe/stages.py): pretrain the captioner, fine-tune SSC
and DSC, recaption, train the evaluation CLIP and the prompt upsampler, train one T2I model per
caption type, evaluate every checkpoint, then write <workdir>/report.md. Rerunning the same
command skips finished stages, so a killed pipeline resumes. --json ends the run by printing one
JSON object with the headline figures per model and the wall time of every stage.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dalle3_jax import configlib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "pipeline.py"),
    "Pipeline config (configs/pipeline.py[:quick|full|tiny]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Pipeline directory; default workdirs/pipeline[_<variant>].")
_JSON = flags.DEFINE_bool("json", False, "End by printing one JSON object with the headline figures.")
_QUIET = flags.DEFINE_bool("quiet", False, "Show only stage lines, not each stage's own progress.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from dalle3_jax.evals import report
    from dalle3_jax.recipe import runner as runner_lib
    from dalle3_jax.recipe import stages as stages_lib

    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("workdirs", "pipeline" + ("" if config.variant == "quick"
                                                                        else f"_{config.variant}"))
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "pipeline_config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=1))
    stages = stages_lib.build(config, workdir)
    runner = runner_lib.Runner(workdir, quiet=_QUIET.value)
    runner.banner(stages)
    records = {}
    try:
        for i, stage in enumerate(stages, 1):
            records[stage.name] = runner.run(stages, i, stage)
    except runner_lib.StageFailed as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    t0 = time.time()
    print(f"writing the report (samples, plots, tables) | pipeline {runner_lib.format_seconds(t0 - runner.started)}",
          flush=True)
    headline = report.write_report(config, workdir, stages, records)
    headline["stage_wall_s"]["report"] = time.time() - t0
    path = os.path.join(workdir, "report.md")
    print(f"pipeline finished in {runner_lib.format_seconds(time.time() - runner.started)} this run; "
          f"report: {path}", flush=True)
    if _JSON.value:
        print(json.dumps(headline), flush=True)
    return 0


if __name__ == "__main__":
    configlib.check_overrides(sys.argv)
    app.run(lambda argv: sys.exit(main(argv)))
