"""The evaluation CLIP (stage 5's judge) as a Task of the shared loop: a contrastive-only CoCa.

CLIP score needs a CLIP that no model under evaluation has seen. On the synthetic world it is
trained only on the `judge` split (scenes disjoint from train, finetune and eval) with the
world's ground-truth captions. Per example the caption is the `descriptive` one with
probability `descriptive_prob`, else the `short` one; the choice is a hash of (caption_seed,
example id) (data/blend.py), so every worker and every resumed run picks the same caption.

What the stage adds to the loop:
  model   CoCa (models/coca.py) with no multimodal decoder layers: only the image tower, the
          contrastive attention pool and the unimodal text tower are built and trained
  loss    coca.loss_fn with w_cap = 0 (the captioning branch is not even traced)
  evals   on the world's `eval` split (evals/clip_score.py all_figures), for short and
          descriptive captions separately: recall@1 image->text and text->image, strict and
          counting identical texts as hits; the mean CLIP score of matching and mismatched
          pairs; and, per fact kind, how often the true image outscores the image with that
          fact changed (swap_colour, swap_shape, swap_size, swap_place, swap_background)

`configs/eval_clip.py` builds on `default_config()`; evals/clip_score.py ClipScorer loads a run.
"""

from __future__ import annotations

from typing import Any

import ml_collections
from flax import nnx

from dalle3_jax import sharding
from dalle3_jax.data import blend as blend_lib
from dalle3_jax.data import pipeline, sources
from dalle3_jax.data import tokenizer as tokenizer_lib
from dalle3_jax.models import coca
from dalle3_jax.trainers import captioner, loop


def default_config(smoke: bool = False, *, image_size: int = 32,
                   single_object: bool = True) -> ml_collections.ConfigDict:
    """An evaluation-CLIP config; `smoke` shrinks it to a seconds-long run for tests."""
    c = loop.loop_config()
    c.trainer = "clip"
    c.total_steps = 1000
    c.log_every = 50
    c.eval_every = 250
    c.checkpoint_every = 250
    c.tokenizer = ""  # a Hugging Face tokenizer directory; "" = the packaged shapes-world one
    c.model = coca.config("tiny")  # architecture (models/coca.py); the decoder half is not built
    c.model.vocab_size = 1024  # >= the tokenizer's vocabulary (checked at start)
    c.model.image_size = image_size  # must match the images it will judge (resized otherwise)
    # Three stride-2 convs, then 1x1 tokens: a 4x4 token grid at 32 px (8x8 at 64 px). An 8x8
    # grid (two convs, patch 4) cost twice as much per step on the 2-core CPU for no gain seen.
    c.model.vit_stem = (32, 64, 128)
    c.model.patch_size = 8
    # A narrow text tower: at width 128 it cost more than the image tower (33 tokens vs 16).
    c.model.text_width = 64
    c.model.multimodal_layers = 0  # contrastive only: no captioning decoder
    c.model.n_caption_queries = 0  # no caption pooler either
    # Text positions: one-object descriptive captions are <= 29 tokens (bos, eos included),
    # any descriptive caption <= 76. Scoring tokenises to the whole table.
    c.model.max_text_len = 32 if single_object else 80
    c.caption_seed = 0  # with the example id, fixes every example's caption choice
    # Chance an example trains on its descriptive caption, else its short one. 0.75 beat 0.5 on
    # the eval split: descriptive recall@1 0.26 vs 0.12 after 500 steps, short recall no worse.
    c.descriptive_prob = 0.75
    c.data = sources.default_data_config()
    c.data.split = "judge"  # disjoint scenes used only to train the evaluation CLIP
    c.data.world = ml_collections.ConfigDict(dict(image_size=max(image_size, 32), single_object=single_object))
    c.input = pipeline.default_input_config()
    c.input.global_batch_size = 128
    c.input.image_size = image_size
    c.input.max_text_len = c.model.max_text_len
    c.loss = ml_collections.ConfigDict()
    c.loss.contrastive = "softmax"  # softmax (InfoNCE) | sigmoid
    c.eval = ml_collections.ConfigDict()
    c.eval.split = "eval"  # held-out scenes: the ones the T2I prompts come from
    c.eval.n_examples = 512  # retrieval is among these, so recall@1 depends on it
    c.eval.batch_size = 128
    c.optim.lr = 2e-3  # 4e-3 learned slower; fixed sin-cos ViT positions too (learned ones are kept)
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.05
    if smoke:
        c.model.update(vit_width=32, vit_depth=1, vit_heads=2, text_width=32, text_heads=2, unimodal_layers=1,
                       pool_heads=2, embed_dim=32, vit_stem=(8, 16), patch_size=4)
        loop.smoke_settings(c)
        c.eval.n_examples = 16
        c.eval.batch_size = 8
    return c


def make_model(config: ml_collections.ConfigDict) -> coca.CoCa:
    """The CoCa model of an evaluation-CLIP config (seeded by config.seed)."""
    return captioner.make_model(config)


def caption_field(config: ml_collections.ConfigDict) -> blend_lib.CaptionBlend:
    """The pipeline caption_field: descriptive with probability descriptive_prob, else short."""
    return blend_lib.CaptionBlend(field="descriptive", blend=float(config.descriptive_prob), fallback="short",
                                  seed=int(config.caption_seed))


class Evaluator:
    """The judge figures on the first eval.n_examples scenes of the world's eval.split."""

    def __init__(self, config: ml_collections.ConfigDict, tokenize: tokenizer_lib.Tokenize, mesh):
        from dalle3_jax.evals import clip_score

        self.config, self.tokenize, self.mesh = config, tokenize, mesh
        self.world = config.data.world.to_dict() if config.data.get("world") else {}
        self.images, self.captions, self.scenes = clip_score.load_judge_set(
            self.world, config.model.image_size, config.eval.n_examples, split=config.eval.split)
        self._scorer = None

    def __call__(self, model: nnx.Module, step: int) -> dict[str, Any]:
        from dalle3_jax.evals import clip_score

        if self._scorer is None or self._scorer.model is not model:
            self._scorer = clip_score.ClipScorer(model, self.tokenize, self.mesh,
                                                 batch_size=self.config.eval.batch_size, step=step)
        scalars = clip_score.all_figures(self._scorer, self.world, self.images, self.captions, self.scenes)
        scalars["n_examples"] = len(self.images)
        return {"scalars": scalars}


def build_task(config: ml_collections.ConfigDict, workdir: str) -> loop.Task:
    """The evaluation-CLIP Task: contrastive-only CoCa on the judge split's true captions."""
    del workdir
    tokenize = tokenizer_lib.Tokenize(tokenizer_lib.load_tokenizer(config.tokenizer or None))
    captioner.check_config(config, tokenize)
    if config.data.source == "world" and config.data.split != "judge":
        raise ValueError(f"the evaluation CLIP trains on the world's judge split only (data.split="
                         f"{config.data.split!r}); no model under evaluation may have seen its data")
    if not 0.0 <= float(config.descriptive_prob) <= 1.0:
        raise ValueError(f"descriptive_prob={config.descriptive_prob} is not a probability")
    source = sources.make_source(config.data)
    field = caption_field(config)
    contrastive = config.loss.contrastive
    evaluator = None

    def train_data():
        return pipeline.make_loader_from_config(source, config.input, tokenizer=tokenize, caption_field=field)

    def loss_fn(model, batch, rng):
        del rng  # deterministic given the batch
        loss, metrics = coca.loss_fn(model, batch, w_con=1.0, w_cap=0.0, contrastive=contrastive)
        return loss, {k: v for k, v in metrics.items() if k not in ("caption_loss", "token_accuracy")}

    def evaluate(model, step):
        nonlocal evaluator
        if evaluator is None:  # built on first use: it renders and prepares the eval images once
            evaluator = Evaluator(config, tokenize, sharding.make_mesh(config.mesh))
        return evaluator(model, step)

    return loop.Task(make_model=lambda: make_model(config), loss_fn=loss_fn, train_data=train_data,
                     evaluate=evaluate, batch_keys=("image", "tokens"),
                     examples_per_step=config.input.global_batch_size)
