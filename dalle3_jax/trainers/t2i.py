"""The T2I diffusion stage as a Task of the shared loop: text encoder + UNet on blended captions.

What the stage adds to the loop:
  data      the Grain pipeline with a `CaptionBlend` caption field (data/blend.py): per example,
            the synthetic caption (ssc / dsc) or the world's true descriptive one with
            probability `blend`, else the alt text; deterministic in (blend_seed, example id)
  loss      diffusion/losses.py: v (or eps) prediction, (min(SNR, 5) + 1) / (SNR + 1) weighting,
            captions dropped to the empty caption with probability `diffusion.cond_drop` so the
            model also learns the unconditional score that guidance needs
  extra     EMA weights (diffusion/ema.py), updated inside the jitted step; evals use them
  latents   with config.autoencoder set, the UNet denoises latents of a frozen autoencoder:
            batches are encoded on the devices before the step (or read from a latent cache)
            and samples are decoded to images (diffusion/latent.py)
  text      with cached_text_states, a frozen pretrained encoder's states come from the records
            (diffusion/text_cache.py) and only the token bag runs on the tokens in the step
  evals     validation loss on held-out captions, a sample grid (TensorBoard and
            workdir/samples/step_N.png) and prompt following on eval-split prompts
            (evals/prompt_following.py), all on the EMA weights

`configs/t2i.py` builds on `default_config()`; `load_run` restores a finished run for
launch/sample.py and the prompt-following CLI.

A pretrained text encoder (`model.text_pretrained`, an HF T5 directory) is frozen: optim.frozen
defaults to "^text/", its weights are read from the directory at a fresh start (a resumed run
takes them from its checkpoint) and the tokenizer is that directory's tokenizer.json unless
`tokenizer` names another.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from dalle3_jax import metrics, models, sharding
from dalle3_jax.data import blend as blend_lib
from dalle3_jax.data import pipeline, sources
from dalle3_jax.data import tokenizer as tokenizer_lib
from dalle3_jax.diffusion import ema as ema_lib
from dalle3_jax.diffusion import latent as latent_lib
from dalle3_jax.diffusion import losses, samplers, schedules, text_cache
from dalle3_jax.models import t2i as t2i_model
from dalle3_jax.trainers import loop

log = logging.getLogger(__name__)

FROZEN_TEXT = "^text/"  # optim.frozen for a pretrained text encoder (the model's `text` params)

def default_config(smoke: bool = False, model_variant: str = "S") -> ml_collections.ConfigDict:
    """A T2I config (the shapes-world recipe); `smoke` shrinks it to a seconds-long run for tests."""
    c = loop.loop_config()
    c.trainer = "t2i"
    c.total_steps = 1200  # what the prototype trained in 20 minutes on an idle 2-core CPU
    c.log_every = 50
    c.eval_every = 200
    c.checkpoint_every = 200
    c.tokenizer = ""  # a Hugging Face tokenizer directory; "" = the packaged shapes-world one
    c.model = t2i_model.config(model_variant)  # architecture (models/t2i.py, unet.py, t5.py)
    c.caption = "descriptive_gt"  # alt | ssc | dsc | descriptive_gt (see data/blend.py CHOICES)
    c.blend = 0.95  # probability of the chosen caption per example; the rest get alt text
    c.blend_seed = 0  # with the example id, fixes every example's caption choice
    c.data = sources.default_data_config()  # training records (world by default)
    c.data.world = ml_collections.ConfigDict(dict(image_size=32, single_object=True))  # WorldConfig overrides
    c.input = pipeline.default_input_config()  # batching and decoding (caption_field is set by `caption`)
    c.input.global_batch_size = 128
    c.input.image_size = 32  # must equal model.unet.image_size (in pixel space)
    c.input.max_text_len = 32  # single-object descriptive captions are <= 29 tokens; use 80 for multi-object
    c.autoencoder = latent_lib.default_config()  # latent diffusion (diffusion/latent.py); default: pixels
    # Read each caption's frozen-encoder states from the records (precompute_latents.py
    # --text_states; needs model.text_pretrained) instead of running the encoder per step.
    c.cached_text_states = False
    c.diffusion = schedules.default_config()  # schedule, timesteps, zero terminal SNR
    c.diffusion.prediction = "v"  # v | eps (what the UNet outputs)
    c.diffusion.weighting = "min_snr_plus_one"  # none | min_snr | min_snr_plus_one (diffusion/losses.py)
    c.diffusion.snr_gamma = 5.0  # the cap of the min-SNR weightings
    c.diffusion.cond_drop = 0.1  # chance a caption is replaced by the empty one (guidance dropout)
    # Chance an example's timestep is drawn from high_noise_start..T-1 instead of 0..T-1
    # (diffusion/losses.py sample_timesteps); 0 = uniform timesteps.
    c.diffusion.high_noise_prob = 0.0
    c.diffusion.high_noise_start = 800  # where the over-sampled high-noise range begins
    c.ema = ml_collections.ConfigDict()
    c.ema.enabled = True  # keep EMA weights (evals and sampling use them)
    c.ema.decay = 0.999  # the EMA decay after warm-up
    c.ema.warmup = True  # decay = min(decay, (1 + n) / (10 + n)) after n steps
    c.sample = ml_collections.ConfigDict()  # defaults of evals, launch/sample.py and prompt following
    c.sample.sampler = "ddim"  # ddim | ddpm | dpmpp_2m
    c.sample.steps = 25  # sampler steps
    c.sample.guidance = 3.0  # classifier-free guidance scale (1 = the conditional model)
    c.sample.eta = 0.0  # DDIM noise (0 deterministic, 1 DDPM-like)
    c.sample.clip_x0 = True  # clip predicted clean images to [-1, 1] at every step
    c.eval = ml_collections.ConfigDict()
    # Held-out records of the validation loss and the grid: "world" = the synthetic world at
    # eval.split with the data.world settings (also when training on recaptioned world records),
    # "data" = the training source (config.data) at eval.split.
    c.eval.source = "world"
    c.eval.split = "eval"  # held-out world scenes (attribute combinations never trained on)
    c.eval.caption_field = "descriptive"  # captions of the validation loss and the sample grid
    c.eval.n_val = 256  # examples of the validation loss (fixed noise and timesteps)
    c.eval.n_grid = 16  # prompts in the logged sample grid
    c.eval.n_prompts = 64  # eval prompts scored for prompt following (scenes as data.world); 0 = off
    c.eval.batch_size = 64  # sampling / validation batch (rounded to the data-parallel size)
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 100
    c.optim.schedule = "constant"  # a time-boxed run can stop at any step; EMA smooths the end
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.0
    if smoke:
        loop.smoke_settings(c)
        c.model = t2i_model.config("tiny")
        c.eval.n_val = 16
        c.eval.n_grid = 8
        c.eval.n_prompts = 8
        c.eval.batch_size = 8
        c.sample.steps = 3
    return c


def make_model(config: ml_collections.ConfigDict) -> t2i_model.TextToImage:
    """The T2I model of a config (seeded by config.seed)."""
    model_cfg = models.with_compute_dtype(config.model, config.get("compute_dtype", ""))
    return t2i_model.create(model_cfg, rngs=nnx.Rngs(config.seed))


def check_config(config: ml_collections.ConfigDict, tokenize: tokenizer_lib.Tokenize) -> schedules.Schedule:
    """Catches settings that would otherwise fail deep inside a compiled step; returns the schedule."""
    if config.model.get("text_pretrained"):
        _check_pretrained_text(config, tokenize)
    elif tokenize.vocab_size > config.model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenize.vocab_size} tokens but model.vocab_size is "
                         f"{config.model.vocab_size}; raise model.vocab_size")
    latent_lib.check(config)  # the UNet's input matches the images' (pixel space) or their latents'
    if text_cache.uses_cache(config):  # a frozen encoder, and a cache made for it and this blending
        from dalle3_jax.diffusion import latent_cache

        text_cache.check(config, latent_cache.read_cache_job(config))
    if config.caption not in blend_lib.CHOICES:
        raise ValueError(f"caption={config.caption!r}; valid: {', '.join(blend_lib.CHOICES)}")
    if config.sample.sampler not in samplers.SAMPLERS:
        raise ValueError(f"sample.sampler={config.sample.sampler!r}; valid: {', '.join(samplers.SAMPLERS)}")
    schedule = schedules.from_config(config.diffusion)
    losses.check(config.diffusion.prediction, config.diffusion.weighting, schedule)
    losses.check_high_noise(float(config.diffusion.get("high_noise_prob", 0.0)),
                            int(config.diffusion.get("high_noise_start", 800)), schedule.timesteps)
    return schedule


def _check_pretrained_text(config: ml_collections.ConfigDict, tokenize: tokenizer_lib.Tokenize) -> None:
    """The tokenizer fits the pretrained encoder (vocabulary, pad and eos ids) and the encoder is frozen."""
    text_cfg = t2i_model.text_config(config.model)
    where = f"model.text_pretrained={config.model.text_pretrained!r}"
    if tokenize.vocab_size > text_cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenize.vocab_size} tokens but the encoder of {where} only "
                         f"{text_cfg.vocab_size}; use that checkpoint's own tokenizer")
    if (tokenize.ids.pad, tokenize.ids.eos) != (text_cfg.pad_id, text_cfg.eos_id):
        raise ValueError(f"the tokenizer's pad/eos ids {tokenize.ids.pad}/{tokenize.ids.eos} differ from those "
                         f"of the encoder of {where} ({text_cfg.pad_id}/{text_cfg.eos_id})")
    if not re.search(config.optim.frozen or "$^", "text/token_embed"):
        raise ValueError(f"optim.frozen={config.optim.frozen!r} does not freeze the pretrained text encoder "
                         f"of {where}; include {FROZEN_TEXT!r}")


def load_tokenize(config: ml_collections.ConfigDict) -> tokenizer_lib.Tokenize:
    """The run's tokenizer: config.tokenizer, else the pretrained text encoder's directory
    (its tokenizer.json), else the packaged shapes-world one."""
    path = config.tokenizer or None
    pretrained = config.model.get("text_pretrained")
    if path is None and pretrained:
        if not os.path.isdir(pretrained):
            raise FileNotFoundError(f"model.text_pretrained={pretrained!r} is not a directory")
        if not os.path.isfile(os.path.join(pretrained, "tokenizer.json")):
            raise FileNotFoundError(
                f"model.text_pretrained={pretrained!r} has no tokenizer.json; save the checkpoint's fast "
                "tokenizer there (AutoTokenizer.from_pretrained(name).save_pretrained(dir)) or set "
                "config.tokenizer to a directory that has one")
        path = pretrained
    return tokenizer_lib.Tokenize(tokenizer_lib.load_tokenizer(path))


def _pretrained_text_loader(config: ml_collections.ConfigDict):
    """Task.init_weights for a pretrained text encoder: reads its weights into a fresh state's
    model (placed on the model's sharding, one tensor at a time) and the EMA copy."""
    from dalle3_jax.weights import t5 as t5_weights

    path, text_cfg = config.model.text_pretrained, t2i_model.text_config(config.model)

    def init_weights(ts: loop.TrainState) -> None:
        report = t5_weights.load_into(ts.model.text, path, text_cfg)
        log.info("text encoder from %s: %s", path, report.summary())
        if ts.extra is not None and hasattr(ts.extra, "model"):  # the EMA starts from the same weights
            nnx.update(ts.extra.model.text, jax.tree.map(lambda x: x.copy(), nnx.state(ts.model.text, nnx.Param)))

    return init_weights


def null_tokens(tokenize: tokenizer_lib.Tokenize, max_len: int) -> np.ndarray:
    """The tokenised empty caption [1, L]: the unconditional input of guidance."""
    return tokenize.encode_batch([""], max_len)[0]


def _rounded_batch(batch_size: int, mesh) -> int:
    dp = sharding.data_parallel_size(mesh)
    return max(dp, (batch_size // dp) * dp)


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    return x if len(x) == size else np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


def sample_captions(model: nnx.Module, config: ml_collections.ConfigDict, tokenize: tokenizer_lib.Tokenize,
                    captions: list[str], mesh, *, seed: int = 0, batch_size: int | None = None,
                    max_text_len: int | None = None, **overrides: Any) -> np.ndarray:
    """One image per caption: uint8 [N, H, W, 3]. Sampler settings come from config.sample,
    overridden by `overrides` (sampler, steps, guidance, eta, clip_x0); guidance None = off."""
    settings = dict(config.sample.to_dict())
    unknown = set(overrides) - set(settings)
    if unknown:
        raise ValueError(f"unknown sampler settings {sorted(unknown)}; valid: {sorted(settings)}")
    settings.update(overrides)
    length = max_text_len or config.input.max_text_len
    tokens, _ = tokenize.encode_batch(captions, length)
    null = null_tokens(tokenize, length)
    schedule = schedules.from_config(config.diffusion)
    # No bigger than needed: a 16-image grid is not padded to a batch of 64 (one more compiled
    # program, but each eval saves three quarters of the grid's sampling work).
    dp = sharding.data_parallel_size(mesh)
    bs = _rounded_batch(min(batch_size or config.eval.batch_size, -(-len(captions) // dp) * dp), mesh)
    out = []
    for i, start in enumerate(range(0, len(captions), bs)):
        chunk = tokens[start:start + bs]
        batch = sharding.replicated_to_global({"tokens": _pad_rows(chunk, bs)}, mesh)
        images = samplers.generate(model, batch["tokens"], jax.random.fold_in(jax.random.key(seed), i), schedule,
                                   null_tokens=null, prediction=config.diffusion.prediction, **settings)
        images = latent_lib.decode_samples(config, mesh, images)  # latents -> pixels (latent diffusion)
        out.append(samplers.to_uint8(images)[:len(chunk)])
    size = int(config.input.image_size)
    return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.uint8)


def eval_source(config: ml_collections.ConfigDict):
    """The held-out records of validation and the sample grid (see config.eval.source)."""
    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    if config.eval.source == "world":
        data_cfg.source = "world"
    elif config.eval.source != "data":
        raise ValueError(f"eval.source={config.eval.source!r}; valid: world, data")
    data_cfg.split = config.eval.split
    if data_cfg.source == "tfds":
        data_cfg.tfds_split = config.eval.split
    return sources.make_source(data_cfg)


class Evaluator:
    """Validation loss, a sample grid and prompt following for one run (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, tokenize: tokenizer_lib.Tokenize, mesh, workdir: str):
        self.config, self.tokenize, self.mesh, self.workdir = config, tokenize, mesh, workdir
        self.schedule = schedules.from_config(config.diffusion)
        source = eval_source(config)
        self.batch_size = _rounded_batch(config.eval.batch_size, mesh)
        n = min(int(config.eval.n_val), len(source))
        if n >= self.batch_size:  # whole batches only, so every example weighs the same
            n -= n % self.batch_size
        field = config.eval.caption_field
        records = [source[i] for i in range(min(max(n, config.eval.n_grid), len(source)))]
        for r in records:
            if field not in (r.get("captions") or {}):
                raise KeyError(f"eval record {r.get('id')} has no caption {field!r}; set eval.caption_field")
        images = np.stack([pipeline.model_image(r["image"], config.input.image_size) for r in records[:n]])
        tokens, _ = tokenize.encode_batch([r["captions"][field] for r in records[:n]], config.input.max_text_len)
        # What the UNet denoises: the images, or their latents (encoded once, here).
        self.val = (latent_lib.to_model_space(config, mesh, images, np.arange(n), self.batch_size), tokens)
        self.grid_captions = [r["captions"][field] for r in records[:config.eval.n_grid]]
        self._val_step = None
        self._prompts = None  # prompt-following prompts, rendered on first use

    def _val_loss(self, model) -> float:
        images, tokens = self.val
        bs, d = self.batch_size, self.config.diffusion
        if self._val_step is None:
            graphdef = nnx.graphdef(model)

            @jax.jit
            def step(state, image, tok, rng):
                m = nnx.merge(graphdef, state)
                enc = m.encode_text(tok)
                loss, _ = losses.diffusion_loss(lambda x, t: m.denoise(x, t, enc), image, rng, self.schedule,
                                                prediction=d.prediction, weighting=d.weighting, gamma=d.snr_gamma)
                return loss

            self._val_step = step
        losses_ = []
        for i, start in enumerate(range(0, len(images), bs)):
            # (A set smaller than one batch is padded by repeating its last example.)
            batch = sharding.replicated_to_global({"image": _pad_rows(images[start:start + bs], bs),
                                                   "tokens": _pad_rows(tokens[start:start + bs], bs)}, self.mesh)
            # Fixed noise and timesteps per batch: successive evals differ only by the weights.
            losses_.append(float(self._val_step(nnx.state(model), batch["image"], batch["tokens"],
                                                jax.random.key(1000 + i))))
        return float(np.mean(losses_))

    def __call__(self, model, step: int) -> dict[str, Any]:
        from dalle3_jax.evals import prompt_following

        scalars = {"val_loss": self._val_loss(model)}
        images = sample_captions(model, self.config, self.tokenize, self.grid_captions, self.mesh)
        grid = metrics.image_grid(images)
        if jax.process_index() == 0:
            from PIL import Image

            os.makedirs(os.path.join(self.workdir, "samples"), exist_ok=True)
            Image.fromarray(grid).save(os.path.join(self.workdir, "samples", f"step_{step:06d}.png"))
        if self.config.eval.n_prompts:
            if self._prompts is None:  # scenes like the training data's (one object or several)
                single = bool(self.config.data.world.get("single_object", False))
                self._prompts = prompt_following.load_prompts(self.config, int(self.config.eval.n_prompts),
                                                              single_object=single)
            scores = prompt_following.score_model(model, self.config, self.tokenize, self.mesh, self._prompts)
            scalars.update({f"pf_{k}": v for k, v in scores.items() if isinstance(v, float)})
        table = "| # | prompt |\n|---|---|\n" + "\n".join(f"| {i} | {c} |" for i, c in enumerate(self.grid_captions))
        return {"scalars": scalars, "images": {"samples": grid}, "texts": {"prompts": table}}


def build_task(config: ml_collections.ConfigDict, workdir: str) -> loop.Task:
    """The T2I Task: TextToImage + the weighted diffusion loss on blended captions, with EMA."""
    pretrained_text = bool(config.model.get("text_pretrained"))
    if pretrained_text and not config.optim.frozen:
        config.optim.frozen = FROZEN_TEXT  # saved with the run's config: the optimizer skips the encoder
    tokenize = load_tokenize(config)
    schedule = check_config(config, tokenize)
    source = sources.make_source(config.data)
    caption_field = blend_lib.from_choice(config.caption, config.blend, config.blend_seed)
    null = null_tokens(tokenize, config.input.max_text_len)
    encode_captions = text_cache.caption_encoder(config, null)  # the encoder, or cached states
    d = config.diffusion
    x0_key = latent_lib.input_key(config)  # "image", or "latent" in latent diffusion
    evaluator = None

    def train_data():
        return pipeline.make_loader_from_config(source, config.input, tokenizer=tokenize, caption_field=caption_field,
                                                cached_latents=latent_lib.uses_cache(config),
                                                cached_text=text_cache.uses_cache(config))

    def loss_fn(model, batch, rng):
        k_drop, k_loss = jax.random.split(rng)
        enc = encode_captions(model, batch, k_drop)  # with guidance dropout
        return losses.diffusion_loss(lambda x, t: model.denoise(x, t, enc), batch[x0_key], k_loss, schedule,
                                     prediction=d.prediction, weighting=d.weighting, gamma=float(d.snr_gamma),
                                     high_noise_prob=float(d.get("high_noise_prob", 0.0)),
                                     high_noise_start=int(d.get("high_noise_start", 800)))

    def evaluate(model, step):
        nonlocal evaluator
        if evaluator is None:  # built on first use: it renders and prepares the eval images once
            evaluator = Evaluator(config, tokenize, sharding.make_mesh(config.mesh), workdir)
        return evaluator(model, step)

    ema_on = bool(config.ema.enabled)
    return loop.Task(
        make_model=lambda: make_model(config), loss_fn=loss_fn, train_data=train_data, evaluate=evaluate,
        batch_keys=latent_lib.batch_keys(config) + text_cache.batch_keys(config),
        prepare_batch=latent_lib.prepare_batch(config),
        examples_per_step=config.input.global_batch_size,
        make_extra=(lambda m: ema_lib.EMA(m, config.ema.decay, config.ema.warmup)) if ema_on else None,
        after_update=(lambda ts, step: ts.extra.update(ts.model, step)) if ema_on else None,
        eval_model=(lambda ts: ts.extra.model) if ema_on else None,
        init_weights=_pretrained_text_loader(config) if pretrained_text else None,
    )


def add_sampler_flags(parser) -> None:
    """The sampling flags shared by launch/sample.py and the prompt-following CLI (argparse)."""
    parser.add_argument("--sampler", default=None, choices=samplers.SAMPLERS, help="default: the run's (ddim)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's, 25)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the run's, 3)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM noise: 0 deterministic, 1 DDPM-like")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--no-ema", action="store_true", help="use the trained weights, not the EMA")


def sampler_overrides(args) -> dict[str, Any]:
    """The sampler settings given on the command line (see add_sampler_flags)."""
    given = dict(sampler=args.sampler, steps=args.steps, guidance=args.guidance, eta=args.eta)
    return {k: v for k, v in given.items() if v is not None}


def load_run(workdir: str, *, step: int | None = None, ema: bool = True, mesh=None):
    """Restores a finished (or running) T2I run for sampling: (config, model, tokenize, mesh, step).

    Reads DIR/config.json and the weights of checkpoint `step` (latest by default): the EMA
    weights when the run kept them and `ema` is True, else the trained ones. The mesh defaults to
    all devices data parallel, whatever mesh the run trained on.
    """
    from dalle3_jax import checkpoint

    config = loop.load_run_config(workdir, "t2i")
    mesh = mesh or sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    tokenize = load_tokenize(config)
    prefix = "extra/model" if ema and config.ema.enabled else "model"
    # An abstract model (shapes and shardings, no values) is the restore target: the weights come
    # from the checkpoint, so no initialiser needs compiling or running.
    graphdef, abstract = sharding.abstract_state(lambda: make_model(config), mesh)
    model = nnx.merge(graphdef, abstract)
    with jax.set_mesh(mesh):
        step = checkpoint.load_model_weights(os.path.join(workdir, "checkpoints"), model, step=step, prefix=prefix)
    return config, model, tokenize, mesh, step
