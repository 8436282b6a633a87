"""The learned prompt upsampler (stage 6) as a Task of the shared loop.

What the stage adds to the loop:
  data    (prompt, description) pairs of the same images, tokenised once and batched by Grain
          (so the data position is checkpointed like every other stage's):
            records  the recaption job's ArrayRecord output, captions `ssc` -> `dsc`; the last
                     `data.n_holdout` pairs are held out for the validation loss
            world    the world's `finetune` split ground truths, `short` -> `descriptive`
                     (when no records are given); validation pairs come from the `eval` split
          Pairs with an empty side are skipped and counted; over-long descriptions are cut
          (keeping eos) and counted.
  model   models/upsampler.py (T5-style encoder, causal decoder cross-attending to it)
  loss    next-token cross-entropy of the description given the prompt
  evals   validation loss and token accuracy; on held-out short prompts (the world's eval split)
          the upsampled prompts' fact scores (upsample.learned.fact_report: keeps_facts, per kind
          keeps_shape / keeps_colour / keeps_count, facts_added, complete, words) with the run's
          `sample` settings and seed 0; a table of example upsamples in the logs

`configs/upsampler.py` builds on `default_config()`; `upsample.learned.Upsampler.from_workdir`
loads a finished run.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from dalle3_jax import models, sharding
from dalle3_jax.data import tokenizer as tokenizer_lib
from dalle3_jax.models import text
from dalle3_jax.models import upsampler as upsampler_model
from dalle3_jax.trainers import loop
from dalle3_jax.upsample import learned

log = logging.getLogger(__name__)


def default_config(smoke: bool = False, model_variant: str = "S") -> ml_collections.ConfigDict:
    """An upsampler config (world ground truths, one object per scene); `smoke` shrinks it to a
    seconds-long run for tests."""
    c = loop.loop_config()
    c.trainer = "upsampler"
    # 600 steps of batch 64 (4 epochs of the finetune split): on one-object scenes the S model
    # keeps every held-out prompt's facts from step 400 (a few minutes on a 2-core CPU).
    c.total_steps = 600
    c.log_every = 50
    c.eval_every = 200
    c.checkpoint_every = 200
    c.tokenizer = ""  # a Hugging Face tokenizer directory; "" = the packaged shapes-world one
    c.model = upsampler_model.config(model_variant)  # architecture (models/upsampler.py)
    c.model.max_target_len = 32  # one-object descriptions <= 29 tokens; 80 holds any description
    c.data = ml_collections.ConfigDict()
    c.data.records = ""  # the recaption job's output (a directory, glob or shard); "" = the world
    c.data.source_caption = "short"  # the prompt side of a pair (records: "ssc")
    c.data.target_caption = "descriptive"  # the description side (records: "dsc")
    c.data.split = "finetune"  # world split of the training pairs (the human-labelled set)
    c.data.world = ml_collections.ConfigDict(dict(single_object=True))  # WorldConfig overrides (pairs, eval)
    c.data.limit = 0  # pairs read from the start of the source; 0 = all
    c.data.n_holdout = 256  # records only: the last n pairs are held out for the validation loss
    c.input = ml_collections.ConfigDict()
    c.input.global_batch_size = 64
    c.input.seed = 0  # shuffle seed (each epoch is reshuffled from it)
    c.eval = ml_collections.ConfigDict()
    c.eval.split = "eval"  # world split of the held-out prompts (and of the validation pairs)
    c.eval.n_val = 512  # validation pairs (world: the eval split's first n; records: the held-out ones)
    c.eval.n_prompts = 256  # held-out short prompts upsampled and scored
    c.eval.batch_size = 128  # validation batch (rounded to the data-parallel size)
    c.eval.n_logged = 8  # example upsamples written to the logs
    c.sample = learned.default_sample_config()  # decoding of evals and Upsampler.upsample
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.01
    if smoke:
        loop.smoke_settings(c)
        del c.input["read_threads"]  # an image-pipeline field this stage does not have
        c.model = upsampler_model.config("tiny", max_source_len=16, max_target_len=32)
        c.data.limit = 256
        c.eval.n_val = 16
        c.eval.n_prompts = 16
        c.eval.batch_size = 16
        c.eval.n_logged = 4
        c.sample.batch_size = 16
    return c


def make_model(config: ml_collections.ConfigDict) -> upsampler_model.Upsampler:
    """The upsampler model of a config (seeded by config.seed)."""
    model_cfg = models.with_compute_dtype(config.model, config.get("compute_dtype", ""))
    return upsampler_model.create(model_cfg, rngs=nnx.Rngs(config.seed))


# ------------------------------------------------------------------------------------------------
# Pairs
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Pairs:
    """Tokenised (prompt, description) pairs. source [N, S], tokens [N, L] int32."""

    source: np.ndarray
    tokens: np.ndarray
    prompts: list[str]
    targets: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:  # Grain's random-access protocol
        return {"source": self.source[i], "tokens": self.tokens[i]}


def world_config(config: ml_collections.ConfigDict):
    from dalle3_jax.data.world import WorldConfig

    overrides = config.data.world.to_dict() if config.data.get("world") else {}
    return WorldConfig(**overrides)


def _world_texts(config, split: str, n: int, fields: tuple[str, str]) -> list[tuple[str, str]]:
    from dalle3_jax.data.world import World

    world = World(world_config(config))
    n = world.config.split_size(split) if n <= 0 else min(n, world.config.split_size(split))
    out = []
    for i in range(n):
        caps = world.text_example(split, i)["captions"]
        out.append((caps[fields[0]], caps[fields[1]]))
    return out


def _record_texts(pattern: str, limit: int, fields: tuple[str, str]) -> list[tuple[str, str]]:
    """Caption pairs of ArrayRecord records (images are never decoded)."""
    from dalle3_jax.data import records as records_lib
    from dalle3_jax.data import sources

    source = sources.ArrayRecordSource(pattern)
    n = len(source) if limit <= 0 else min(limit, len(source))
    out = []
    for i in range(n):
        rec = records_lib.decode_record(source.read_raw(i))
        caps = rec.get("captions") or {}
        missing = [f for f in fields if f not in caps]
        if missing:
            raise KeyError(f"record {rec.get('id', i)} of {pattern!r} has no caption {missing[0]!r} (it has "
                           f"{sorted(caps)}); set data.source_caption / data.target_caption, or recaption "
                           "with both captioners (launch/recaption.py)")
        out.append((caps[fields[0]], caps[fields[1]]))
    return out


def tokenise_pairs(texts: list[tuple[str, str]], tokenize: tokenizer_lib.Tokenize, model_config,
                   what: str) -> Pairs:
    """Pairs as fixed-length tokens; pairs with an empty side are dropped, over-long sides cut
    (keeping eos); both are counted in the log."""
    kept = [(a, b) for a, b in texts if a.strip() and b.strip()]
    if len(kept) < len(texts):
        log.warning("upsampler %s: skipped %d of %d pairs with an empty caption", what, len(texts) - len(kept),
                    len(texts))
    if not kept:
        raise ValueError(f"upsampler {what}: no pair with both captions non-empty")
    prompts, targets = [a for a, _ in kept], [b for _, b in kept]
    s_len, t_len = int(model_config.max_source_len), int(model_config.max_target_len)
    source, s_lengths = tokenize.encode_batch(prompts, s_len + 1)
    tokens, t_lengths = tokenize.encode_batch(targets, t_len + 1)
    cut_s, cut_t = int(np.sum(s_lengths > s_len)), int(np.sum(t_lengths > t_len))
    if cut_s or cut_t:
        log.warning("upsampler %s: %d prompts longer than max_source_len=%d and %d descriptions longer than "
                    "max_target_len=%d tokens were cut", what, cut_s, s_len, cut_t, t_len)
    source, _ = tokenize.encode_batch(prompts, s_len)
    tokens, _ = tokenize.encode_batch(targets, t_len)
    return Pairs(source, tokens, prompts, targets)


def load_pairs(config: ml_collections.ConfigDict, tokenize: tokenizer_lib.Tokenize) -> tuple[Pairs, Pairs]:
    """(training pairs, validation pairs) as the config's `data` block asks."""
    d = config.data
    fields = (d.source_caption, d.target_caption)
    n_val = int(config.eval.n_val)
    if d.records:
        texts = _record_texts(d.records, int(d.limit), fields)
        hold = min(int(d.n_holdout), len(texts) // 2)
        train_texts, val_texts = texts[:len(texts) - hold], texts[len(texts) - hold:][:n_val]
        where = f"records {d.records!r}"
    else:
        train_texts = _world_texts(config, d.split, int(d.limit), fields)
        val_texts = _world_texts(config, config.eval.split, n_val, fields)
        where = f"world {d.split!r} split"
    train = tokenise_pairs(train_texts, tokenize, config.model, "training pairs")
    val = tokenise_pairs(val_texts, tokenize, config.model, "validation pairs") if val_texts else None
    log.info("upsampler: %d training pairs (%s -> %s) from %s; %d validation pairs", len(train), *fields, where,
             len(val) if val else 0)
    return train, val


def make_loader(pairs: Pairs, global_batch_size: int, seed: int) -> grain.IterDataset:
    """Shuffled, repeated batches {"source", "tokens"} of this process's shard of the pairs."""
    pc, pi = jax.process_count(), jax.process_index()
    if global_batch_size % pc:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by {pc} processes")
    batch = global_batch_size // pc
    shard_len = len(pairs) // pc
    if shard_len < batch:
        raise ValueError(f"{len(pairs)} pairs make no batch of {global_batch_size} on {pc} process(es)")
    ds = grain.MapDataset.source(pairs)[pi : shard_len * pc : pc].shuffle(seed=seed).repeat(None)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=0)).batch(batch, drop_remainder=True)


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


def eval_prompts(config: ml_collections.ConfigDict) -> list[str]:
    """The held-out short prompts: the short ground truths of the world's eval split (scenes as
    data.world; disjoint from the training scenes)."""
    return [a for a, _ in _world_texts(config, config.eval.split, int(config.eval.n_prompts), ("short", "descriptive"))]


class Evaluator:
    """Validation loss and fact scores of upsampled held-out prompts (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, tokenize: tokenizer_lib.Tokenize, mesh, val: Pairs | None):
        self.config, self.tokenize, self.mesh, self.val = config, tokenize, mesh, val
        dp = sharding.data_parallel_size(mesh)
        self.batch_size = max(dp, (int(config.eval.batch_size) // dp) * dp)
        self.prompts = eval_prompts(config) if config.eval.n_prompts else []
        self._loss = None

    def _val_loss(self, model) -> dict[str, float]:
        pad, eos = self.config.model.pad_id, self.config.model.eos_id
        if self._loss is None:
            graphdef = nnx.graphdef(model)

            @jax.jit
            def per_example(state, source, tokens):
                logits = nnx.merge(graphdef, state)(source, tokens)[:, :-1].astype(jnp.float32)
                mask = text.token_mask(tokens, pad, eos)[:, 1:].astype(jnp.float32)
                ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
                correct = (jnp.argmax(logits, axis=-1) == tokens[:, 1:]).astype(jnp.float32)
                return jnp.sum(ce * mask, 1), jnp.sum(correct * mask, 1), jnp.sum(mask, 1)

            self._loss = per_example
        sums = np.zeros(3)
        bs, n = self.batch_size, len(self.val)
        for start in range(0, n, bs):
            rows = np.arange(start, min(start + bs, n))
            k = len(rows)
            rows = np.concatenate([rows, np.full(bs - k, rows[-1])])
            batch = sharding.global_batch({"source": self.val.source[rows], "tokens": self.val.tokens[rows]}, self.mesh)
            out = self._loss(nnx.state(model), batch["source"], batch["tokens"])
            sums += [float(np.sum(np.asarray(x)[:k])) for x in out]  # padded rows dropped
        return {"val_loss": float(sums[0] / sums[2]), "val_token_accuracy": float(sums[1] / sums[2])}

    def __call__(self, model, step: int) -> dict[str, Any]:
        scalars: dict[str, float] = {}
        if self.val is not None:
            scalars.update(self._val_loss(model))
        texts = {}
        if self.prompts:
            upsampler = learned.Upsampler(model, self.tokenize, self.mesh, sample=self.config.sample)
            outs = upsampler.upsample(self.prompts, seed=0)
            scalars.update(learned.fact_report(self.prompts, outs))
            n = int(self.config.eval.n_logged)
            lines = [f"| {p} | {o} |" for p, o in zip(self.prompts[:n], outs[:n])]
            texts["upsamples"] = "| prompt | upsampled |\n|---|---|\n" + "\n".join(lines)
            for p, o in zip(self.prompts[:n], outs[:n]):
                log.info("upsample at step %d: %r -> %r", step, p, o)
        return {"scalars": scalars, "texts": texts}


# ------------------------------------------------------------------------------------------------
# The Task
# ------------------------------------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict, tokenize: tokenizer_lib.Tokenize) -> None:
    """Catches settings that would otherwise fail deep inside a compiled step or an eval."""
    if tokenize.vocab_size > config.model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenize.vocab_size} tokens but model.vocab_size is "
                         f"{config.model.vocab_size}; raise model.vocab_size")
    defaults = learned.default_sample_config()
    unknown = sorted(set(config.sample.keys()) - set(defaults.keys()))
    if unknown:
        raise ValueError(f"unknown sample settings {unknown}; valid: {sorted(defaults.keys())}")
    settings = {k: v for k, v in config.sample.items() if k != "batch_size"}
    settings["max_len"] = int(settings["max_len"]) or int(config.model.max_target_len) - 1
    from dalle3_jax.recaption import decode

    decode.Settings(**settings).validate()


def build_task(config: ml_collections.ConfigDict, workdir: str) -> loop.Task:
    """The upsampler Task: prompt -> description next-token loss on caption pairs."""
    tokenize = tokenizer_lib.Tokenize(tokenizer_lib.load_tokenizer(config.tokenizer or None))
    check_config(config, tokenize)
    train, val = load_pairs(config, tokenize)
    evaluator = None

    def loss_fn(model, batch, rng):
        del rng  # deterministic given the batch
        return upsampler_model.loss_fn(model, batch)

    def evaluate(model, step):
        nonlocal evaluator
        if evaluator is None:
            evaluator = Evaluator(config, tokenize, sharding.make_mesh(config.mesh), val)
        return evaluator(model, step)

    return loop.Task(make_model=lambda: make_model(config), loss_fn=loss_fn,
                     train_data=lambda: make_loader(train, int(config.input.global_batch_size), int(config.input.seed)),
                     evaluate=evaluate, batch_keys=("source", "tokens"),
                     examples_per_step=int(config.input.global_batch_size))
