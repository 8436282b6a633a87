"""The recipe's stages as commands: what `launch/pipeline.py` runs, in order, from a pipeline config.

Every stage is an ordinary entry point a user could type (launch/train.py, launch/recaption.py,
launch/evaluate.py, launch/sample.py) with its own run directory under the pipeline's workdir:

  pretrain      stage 1   CoCa on the train split's alt text (contrastive + captioning)
  ssc, dsc      stage 2   short and descriptive captioners fine-tuned from the pretrain run
  recaption     stage 3   SSC and DSC captions for the first `recaption.n` train images
  eval_clip     stage 5   the judge-split CLIP that scores every T2I model
  upsampler     stage 6   learned short -> descriptive prompt upsampler (SSC, DSC pairs)
  t2i_<name>    stage 4   one T2I model per `t2i.runs` entry, all on the recaptioned images
  evaluate      stage 5   CLIP score and prompt following over every model's checkpoints, and
                          caption quality of alt text, SSC, DSC and the ground truths
(the report, written in the pipeline's own process, adds samples of every model for the same
prompts and prompt following from upsampled short prompts)

Running them one process each keeps a crash or a kill inside one stage, and each stage resumes
from its own checkpoints or committed shards.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass
class Stage:
    """One step of the pipeline.

    Attributes:
      name: unique key (run directory name, log file name, --json key).
      title: one line for the progress display.
      argv: the command, run from the repository root.
      run_dir: the directory the stage writes (its checkpoints, shards or JSON).
      group: the report section the stage belongs to (captioner, t2i, evaluation, ...).
    """

    name: str
    title: str
    argv: list[str]
    run_dir: str
    group: str


def _script(name: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "launch", name)]


def _variant(tiny: bool, **kv) -> str:
    """A config variant string; `tiny` prepends the configs' seconds-long smoke variant."""
    return ",".join((["tiny"] if tiny else []) + [f"{k}={v}" for k, v in kv.items()])


def t2i_checkpoint_every(config: ml_collections.ConfigDict) -> int:
    """Checkpoint spacing so a T2I run leaves `t2i.checkpoints` evenly spaced checkpoints."""
    return max(1, int(config.t2i.steps) // max(1, int(config.t2i.checkpoints)))


def build(config: ml_collections.ConfigDict, workdir: str) -> list[Stage]:
    """The stages of a pipeline config, in run order, writing under `workdir`."""
    w = config.world
    tiny = config.variant == "tiny"
    world = dict(single_object=bool(w.single_object), image_size=int(w.image_size))
    d = lambda name: os.path.join(workdir, name)  # noqa: E731
    common = [f"--config.seed={int(config.seed)}"]
    # Captions of one-object scenes are short: a tighter token budget makes every captioner step cheaper.
    text_len = ["--config.input.max_text_len=32", "--config.eval.decode.max_len=32"] if w.single_object and not tiny else []
    cap = config.captioner
    stages = [
        Stage("pretrain", "stage 1: pretrain the CoCa captioner on alt text",
              _script("train.py") + [f"--config=configs/captioner_pretrain.py:" + _variant(tiny,
                  model=cap.model, steps=cap.pretrain_steps, **world), f"--workdir={d('pretrain')}",
                  "--config.eval_every=0"] + common, d("pretrain"), "captioner"),
    ]
    for name, cfg, steps, what in (("ssc", "captioner_short", cap.ssc_steps, "short"),
                                   ("dsc", "captioner_descriptive", cap.dsc_steps, "descriptive")):
        stages.append(Stage(
            name, f"stage 2: fine-tune the {what} captioner ({name.upper()})",
            _script("train.py") + [f"--config=configs/{cfg}.py:" + _variant(tiny,
                model=cap.model, steps=steps, init_from=os.path.join(d("pretrain"), "checkpoints"), **world),
                f"--workdir={d(name)}", "--config.eval_every=0", f"--config.optim.lr={float(cap.finetune_lr)}"]
            + common + text_len, d(name), "captioner"))
    rc = config.recaption
    stages.append(Stage(
        "recaption", f"stage 3: recaption {rc.n} train images with SSC and DSC",
        _script("recaption.py") + [f"--config=configs/recaption.py:" + _variant(tiny,
            ssc=d("ssc"), dsc=d("dsc"), n=rc.n, out=d("recaption"), **world),
            f"--config.records_per_shard={int(rc.records_per_shard)}"], d("recaption"), "recaption"))
    stages.append(Stage(
        "eval_clip", "stage 5: train the evaluation CLIP on the judge split",
        _script("train.py") + [f"--config=configs/eval_clip.py:" + _variant(tiny, steps=config.eval_clip.steps, **world),
                               f"--workdir={d('eval_clip')}"] + common, d("eval_clip"), "evaluation"))
    if config.upsampler.enabled:
        stages.append(Stage(
            "upsampler", "stage 6: train the learned prompt upsampler on (SSC, DSC) pairs",
            _script("train.py") + [f"--config=configs/upsampler.py:" + _variant(tiny,
                records=d("recaption"), steps=config.upsampler.steps, single_object=world["single_object"]),
                f"--workdir={d('upsampler')}"] + common, d("upsampler"), "upsampling"))
    t = config.t2i
    for name, run in t.runs.items():
        argv = _script("train.py") + [
            f"--config=configs/t2i.py:" + _variant(tiny, caption=run.caption, blend=run.blend, records=d("recaption"),
                                                   model=t.model, steps=t.steps, **world),
            f"--workdir={d('t2i_' + name)}",
            # Every model reads the same recaptioned records, alt text included, so only the
            # caption differs between them.
            "--config.data.source=arrayrecord", f"--config.data.arrayrecord_pattern={d('recaption')}",
            # Prompt following is measured by the eval stage over all checkpoints, not in training.
            "--config.eval.n_prompts=0", "--config.eval_every=0",
            f"--config.checkpoint_every={t2i_checkpoint_every(config)}", "--config.keep_checkpoints=100",
        ] + common
        stages.append(Stage(f"t2i_{name}", f"stage 4: train T2I on {_describe(run)}", argv, d(f"t2i_{name}"), "t2i"))
    e = config.evaluate
    sampler = [f"--sampler={e.sampler}", f"--sampler_steps={int(e.sampler_steps)}", f"--guidance={float(e.guidance)}",
               f"--seed={int(config.seed)}"]
    # One process for every model and the captioners: the CLIP, the compiled sampler (the models
    # share an architecture) and the eval scenes are loaded once.
    stages.append(Stage(
        "evaluate", "stage 5: CLIP score and prompt following over every T2I checkpoint; caption quality",
        _script("evaluate.py") + [
            "--workdir=" + ",".join(d(f"t2i_{name}") for name in t.runs), f"--clip_workdir={d('eval_clip')}",
            "--steps=all", f"--n_prompts={int(e.n_prompts)}", f"--k={int(e.k)}"] + sampler + [
            f"--captioners={d('ssc')},{d('dsc')}", f"--caption_n={int(e.caption_eval_n)}",
            f"--out={os.path.join(d('report'), 'caption_quality.json')}"],
        d("report"), "evaluation"))
    return stages


def _describe(run: ml_collections.ConfigDict) -> str:
    if run.caption == "alt":
        return "alt text only"
    return f"{run.caption.upper()} captions {round(100 * float(run.blend))}% / alt text"
