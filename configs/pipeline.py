"""The whole recipe on the synthetic world (stages 1-6), ending in workdirs/pipeline/report.md.

    python launch/pipeline.py                                        # quick: < 20 min on a 2-core CPU
    python launch/pipeline.py --config=configs/pipeline.py:full      # the faithful one (< 3 h there)
    python launch/pipeline.py --config=configs/pipeline.py:tiny --workdir=/tmp/pipeline_tiny  # smoke
    python launch/pipeline.py --json --config.t2i.steps=400          # any field can be overridden

Variants (after the colon, comma-separated):
  quick           the default: one object per scene at 32 px, three T2I models (alt, SSC 95%,
                  DSC 95%) trained for a few minutes each
  full            the paper's experiment: scenes of 1-4 groups, longer runs, and the blend
                  ablation (DSC at 65/80/90/95%) plus learned prompt upsampling in the report
  tiny            seconds-long stages for tests (same stages, same files, meaningless numbers)
  single_object   override the variant's world slice (true = one object per scene)

Each stage runs as its own process in its own directory under the pipeline's workdir, so a
killed pipeline reruns with the same command and skips every finished stage.
"""

import ml_collections

from dalle3_jax import configlib


def _t2i_runs(*runs: tuple[str, str, float]) -> ml_collections.ConfigDict:
    """name -> (caption, blend) of the T2I models to train; names key the report and --json."""
    return ml_collections.ConfigDict({name: dict(caption=caption, blend=blend) for name, caption, blend in runs})


def get_config(arg=None):
    arg = configlib.parse_arg(arg, tiny=False, quick=False, full=False, single_object="")
    if arg.tiny and arg.full:
        raise ValueError("pick one of tiny, quick, full")
    variant = "tiny" if arg.tiny else "full" if arg.full else "quick"
    c = ml_collections.ConfigDict()
    c.variant = variant  # recorded in the report
    c.seed = 0  # passed to every stage's config.seed

    c.world = ml_collections.ConfigDict()
    # The quick slice is one object per scene: the only slice in which five stages fit 20 CPU minutes.
    c.world.single_object = variant != "full" if arg.single_object == "" else arg.single_object in ("1", "true", "True")
    c.world.image_size = 32  # render size of every stage (the T2I model's resolution)

    c.captioner = ml_collections.ConfigDict()
    c.captioner.model = "tiny"  # CoCa size (models/coca.py variants)
    c.captioner.pretrain_steps = {"tiny": 4, "quick": 300, "full": 2000}[variant]  # stage 1, batch 64 alt text
    c.captioner.ssc_steps = {"tiny": 4, "quick": 200, "full": 2000}[variant]  # stage 2a on the finetune split
    c.captioner.dsc_steps = {"tiny": 4, "quick": 800, "full": 3000}[variant]  # stage 2b on the finetune split
    # Fine-tuning lr: on one-object 32 px scenes a DSC at 3e-3 reached fact recall 0.66 in 1,000
    # steps (1e-3: 0.27 at 500 steps, against 0.46 at 3e-3); shape is the last fact learned.
    c.captioner.finetune_lr = 3e-3 if c.world.single_object else 1e-3

    c.recaption = ml_collections.ConfigDict()
    # Train-split images recaptioned by SSC and DSC; every T2I model trains on these same images.
    c.recaption.n = {"tiny": 64, "quick": 8192, "full": 65536}[variant]
    c.recaption.records_per_shard = {"tiny": 32, "quick": 2048, "full": 8192}[variant]  # unit of resume

    c.eval_clip = ml_collections.ConfigDict()
    c.eval_clip.steps = {"tiny": 4, "quick": 300, "full": 2000}[variant]  # the judge-split CLIP

    c.upsampler = ml_collections.ConfigDict()
    c.upsampler.enabled = True  # stage 6: learned short -> descriptive prompt upsampler
    c.upsampler.steps = {"tiny": 4, "quick": 150, "full": 1500}[variant]

    c.t2i = ml_collections.ConfigDict()
    c.t2i.model = "tiny" if variant == "tiny" else "S"  # UNet size (models/t2i.py variants)
    c.t2i.steps = {"tiny": 4, "quick": 300, "full": 2400}[variant]  # optimizer steps per model, batch 128
    c.t2i.checkpoints = {"tiny": 1, "quick": 3, "full": 6}[variant]  # evenly spaced checkpoints evaluated
    if variant == "full":
        c.t2i.runs = _t2i_runs(("alt", "alt", 1.0), ("ssc95", "ssc", 0.95), ("dsc65", "dsc", 0.65),
                               ("dsc80", "dsc", 0.80), ("dsc90", "dsc", 0.90), ("dsc95", "dsc", 0.95))
    else:
        c.t2i.runs = _t2i_runs(("alt", "alt", 1.0), ("ssc95", "ssc", 0.95), ("dsc95", "dsc", 0.95))

    c.evaluate = ml_collections.ConfigDict()
    c.evaluate.n_prompts = {"tiny": 8, "quick": 96, "full": 256}[variant]  # eval prompts per prompt set
    c.evaluate.k = 1  # images per prompt
    c.evaluate.sampler = "ddim"  # sampler of every generated image in the report
    c.evaluate.sampler_steps = {"tiny": 3, "quick": 25, "full": 25}[variant]
    c.evaluate.guidance = 3.0  # classifier-free guidance scale
    c.evaluate.n_caption_examples = 6  # rows of the caption examples table
    c.evaluate.n_grid = 8  # prompts of the side-by-side sample grids
    c.evaluate.caption_eval_n = {"tiny": 16, "quick": 256, "full": 512}[variant]  # images scored per captioner
    return c
