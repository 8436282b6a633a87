"""The captioner stage (CoCa pretraining, SSC / DSC fine-tuning) as a Task of the shared loop.

The stage adds only what is its own: the CoCa model, its loss (contrastive + captioning, with
weights from `config.loss`), a loader over the configured caption field, and the captioner
evals (validation loss, retrieval recall@1, caption fact precision / recall, example captions).
`configs/captioner_{pretrain,short,descriptive}.py` start from `default_config()`.
"""

from __future__ import annotations

import ml_collections
from flax import nnx

from dalle3_jax import models, sharding
from dalle3_jax.data import pipeline, sources
from dalle3_jax.data import tokenizer as tokenizer_lib
from dalle3_jax.models import coca
from dalle3_jax.trainers import loop


def default_config(smoke: bool = False, model_variant: str = "tiny") -> ml_collections.ConfigDict:
    """A captioner config; `smoke` shrinks everything to a seconds-long run for tests."""
    c = loop.loop_config()
    c.trainer = "captioner"
    c.tokenizer = ""  # a Hugging Face tokenizer directory; "" = the packaged shapes-world one
    c.model = coca.config(model_variant)  # architecture (see dalle3_jax/models/coca.py)
    c.model.vocab_size = 1024  # >= the tokenizer's vocabulary (checked at start)
    c.model.max_text_len = 80  # descriptive captions are <= 76 tokens with the packaged tokenizer
    # Three stride-2 convs before 1x1 patches: on the shapes world a plain patch-8 ViT learned
    # colour but no shape from the finetune split; early convolutions learned shape faster.
    c.model.vit_stem = (32, 64, 128)
    # The decoder reads all 64 image tokens rather than 32 pooled queries: descriptive captions
    # name every object's cell (a from-scratch DSC after 750 steps: fact recall 0.27 vs 0.25).
    c.model.n_caption_queries = 0
    c.init = ml_collections.ConfigDict()
    # A Hugging Face CLIP checkpoint directory whose vision tower starts CoCa's ViT (patch
    # embedding, patch positions, blocks; weights/clip.py:init_coca_vision); "" = from scratch.
    # Needs a matching ViT: vit_stem=(), learned positions, CLIP's width/depth/heads/patch size.
    c.init.clip_vision = ""
    c.data = sources.default_data_config()  # where training records come from (world by default)
    c.input = pipeline.default_input_config()  # batching, caption field, workers
    c.input.global_batch_size = 64
    c.input.image_size = c.model.image_size
    c.input.max_text_len = 80
    c.loss = ml_collections.ConfigDict()
    c.loss.w_con = 1.0  # weight of the contrastive loss (0 removes that branch from the step)
    c.loss.w_cap = 2.0  # weight of the captioning loss (CoCa uses 2:1 captioning:contrastive)
    c.loss.contrastive = "softmax"  # softmax (InfoNCE) | sigmoid
    c.eval = ml_collections.ConfigDict()
    c.eval.split = "eval"  # held-out scenes
    c.eval.n_examples = 512  # eval images (retrieval is among these, so R@1 depends on it)
    c.eval.batch_size = 128  # eval batch (rounded to the data-parallel size)
    c.eval.caption_field = "descriptive"  # reference text for val loss and retrieval
    c.eval.n_logged = 4  # example captions written to the logs
    c.eval.decode = ml_collections.ConfigDict()
    c.eval.decode.max_len = 80  # new tokens per caption
    c.eval.decode.method = "greedy"
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.optim.weight_decay = 0.05
    if smoke:
        c.model.update(vit_width=32, vit_depth=1, vit_heads=2, text_width=32, text_heads=2, unimodal_layers=1,
                       multimodal_layers=1, n_caption_queries=4, pool_heads=2, embed_dim=32, patch_size=16,
                       vit_stem=(8, 16))
        c.model.max_text_len = 24
        c.input.max_text_len = 24
        loop.smoke_settings(c)
        c.eval.n_examples = 16
        c.eval.batch_size = 8
        c.eval.decode.max_len = 8
    return c


def finetune_config(arg: ml_collections.ConfigDict, caption_field: str) -> ml_collections.ConfigDict:
    """Stage 2 (SSC / DSC): captioning-only fine-tuning on the finetune split's `caption_field`,
    starting from `arg.init_from` (a pretraining run's checkpoints; "none" = from scratch)."""
    c = default_config(smoke=arg.tiny, model_variant=arg.model)
    c.init_from = "" if arg.init_from == "none" else arg.init_from  # params of the pretrained captioner
    c.data.split = "finetune"  # the small human-labelled set
    c.input.caption_field = caption_field
    c.loss.w_con = 0.0  # fine-tuning is captioning only
    c.loss.w_cap = 1.0
    c.eval.caption_field = caption_field
    return c


def apply_world_variant(c: ml_collections.ConfigDict, arg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The world-slice variant keys shared by the captioner configs: `single_object` (one object
    per scene, the quick pipeline's slice) and `image_size` (render and model resolution; 0 keeps
    the model's). Training, eval and recaptioning then all see the same world."""
    if arg.single_object:
        c.data.world.single_object = True
    if arg.image_size:
        c.data.world.image_size = arg.image_size
        c.model.image_size = arg.image_size
        c.input.image_size = arg.image_size
    return c


def make_model(config: ml_collections.ConfigDict, *, pretrained: bool = False) -> coca.CoCa:
    """The CoCa model of a captioner config (seeded by config.seed); with `pretrained`, its ViT
    starts from the CLIP vision tower in `config.init.clip_vision`, if one is named."""
    model_cfg = models.with_compute_dtype(config.model, config.get("compute_dtype", ""))
    model = coca.create(model_cfg, rngs=nnx.Rngs(config.seed))
    clip_vision = config.get("init", {}).get("clip_vision", "") if pretrained else ""
    if clip_vision:
        from dalle3_jax.weights import clip as clip_weights

        clip_weights.init_coca_vision(model, clip_vision)
    return model


def check_config(config: ml_collections.ConfigDict, tokenize: tokenizer_lib.Tokenize) -> None:
    """Catches settings that would otherwise fail deep inside a compiled step."""
    if tokenize.vocab_size > config.model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenize.vocab_size} tokens but model.vocab_size is "
                         f"{config.model.vocab_size}; raise model.vocab_size")
    if config.input.image_size != config.model.image_size:
        raise ValueError(f"input.image_size={config.input.image_size} differs from "
                         f"model.image_size={config.model.image_size}")
    if config.input.max_text_len > config.model.max_text_len:
        raise ValueError(f"input.max_text_len={config.input.max_text_len} exceeds the model's "
                         f"position table (model.max_text_len={config.model.max_text_len})")


def build_task(config: ml_collections.ConfigDict, workdir: str) -> loop.Task:
    """The captioner Task: CoCa + its loss on `config.input.caption_field` captions."""
    from dalle3_jax.evals import captions as caption_evals

    tokenize = tokenizer_lib.Tokenize(tokenizer_lib.load_tokenizer(config.tokenizer or None))
    check_config(config, tokenize)
    source = sources.make_source(config.data)
    weights = dict(w_con=float(config.loss.w_con), w_cap=float(config.loss.w_cap),
                   contrastive=config.loss.contrastive)
    evaluator = None

    def train_data():
        return pipeline.make_loader_from_config(source, config.input, tokenizer=tokenize)

    def loss_fn(model, batch, rng):
        del rng  # CoCa training is deterministic given the batch
        return coca.loss_fn(model, batch, **weights)

    def evaluate(model, step):
        nonlocal evaluator
        if evaluator is None:  # built on first use: it prepares the eval images once
            evaluator = caption_evals.evaluator_from_config(config, sharding.make_mesh(config.mesh), tokenize)
        return evaluator(model)

    # Only a fresh run uses init.clip_vision: resuming, or `init_from`, replaces the params.
    return loop.Task(make_model=lambda: make_model(config, pretrained=True), loss_fn=loss_fn, train_data=train_data,
                     evaluate=evaluate, batch_keys=("image", "tokens"),
                     examples_per_step=config.input.global_batch_size)
