"""Autoregressive decoding with a KV cache: greedy, beam search and top-k / top-p sampling.

    tokens = generate(model, images, max_len=32)                       # a captioner: greedy
    tokens = generate(model, images, method="beam", beam_size=4, length_penalty=0.6)
    tokens = generate(model, images, method="sample", top_p=0.9, temperature=0.8, rng=key)
    tokens = generate(upsampler, prompt_tokens, max_len=80)            # a text-to-text model

The conditioning input is whatever the model decodes from, batch first: images [B, H, W, 3]
for a captioner (models/coca.py), source tokens [B, S] for the prompt upsampler
(models/upsampler.py). `tokens` is int32 [B, max_len]: the text without bos, then eos, then pad
to the end (a text that reaches max_len without eos is simply cut). Everything runs in one
jitted program with static shapes: the input is encoded once, the cross-attention K/V of the
decoder are computed once, and a `lax.while_loop` feeds one token per step through the text
decoder's self-attention caches [B, H, max_len, K], stopping as soon as every sequence is done.

Settings that change the program (method, sizes, penalties) are static: each distinct
combination compiles once per input shape and is cached by `jax.jit`; `TRACE_COUNTS` records
how often each program was traced, so callers and tests can check that nothing recompiles.

`generate_uncached` is the reference: greedy decoding that reruns the full training-time
forward pass over the whole static-length prefix at every step. It is the correctness oracle
for the cache and the baseline for benchmarks.

A model is decodable if it has `config.{pad_id, bos_id, eos_id, vocab_size}`,
`start_decoding(inputs, cache_len) -> (cross, cache)`, `decode_step(tokens [B, 1], index,
cache, cross) -> (logits [B, 1, V], cache)` (`cross` is any pytree with batch-first leaves, e.g.
the cross-attention K/V and a context mask; beam search repeats it per beam), and for the
reference `decode_context(inputs)` and `decode_logits(context, tokens) -> logits [B, L, V]`.

Dimension letters: B batch, K beams, L max_len, V vocabulary.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

METHODS = ("greedy", "beam", "sample")
# Finite "minus infinity": banned tokens and dead beams stay comparable without inf - inf = NaN.
NEG = -1e9
# How many times each decoding program was traced (= compiled for a new shape or setting).
TRACE_COUNTS: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class Settings:
    """Decoding settings; hashable, so they can be a static argument of `jax.jit`."""

    max_len: int = 32  # generated tokens per caption (eos included), excluding bos
    method: str = "greedy"  # "greedy", "beam" or "sample"
    beam_size: int = 4  # beams per input (method="beam")
    top_k: int = 0  # sample only among the k most likely tokens (0 = all)
    top_p: float = 1.0  # nucleus sampling: smallest set of tokens with this total probability
    temperature: float = 1.0  # logits are divided by this before sampling
    min_len: int = 0  # eos is forbidden before this many tokens have been generated
    repetition_penalty: float = 1.0  # > 1 discourages tokens already generated (CTRL-style)
    no_repeat_ngram: int = 0  # n > 0: never generate an n-gram that already occurred
    length_penalty: float = 0.0  # beam score = log-prob / length**length_penalty

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Unknown decoding method {self.method!r}; expected one of {METHODS}.")
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        if not 0 <= self.min_len <= self.max_len:
            raise ValueError(f"min_len must be in [0, max_len={self.max_len}], got {self.min_len}")
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0 or self.temperature <= 0.0:
            raise ValueError(f"need top_k >= 0, 0 < top_p <= 1, temperature > 0; got {self}")
        if self.repetition_penalty <= 0.0 or self.no_repeat_ngram < 0:
            raise ValueError(f"need repetition_penalty > 0 and no_repeat_ngram >= 0; got {self}")


# ------------------------------------------------------------------------------------------------
# Logit processing (shared by every method and by the reference path)
# ------------------------------------------------------------------------------------------------


def _ngram_bans(seq: jax.Array, t: jax.Array, n: int, vocab: int) -> jax.Array:
    """Tokens that would complete an n-gram already present in seq[:, :t+1].

    seq [B, L+1] is bos followed by the generated tokens; seq[:, t] is the latest one. Returns
    bool [B, V]. Static shapes: every start j is tested and starts whose n-gram is not fully
    inside seq[:, :t+1] are discarded.
    """
    b, length = seq.shape
    padded = jnp.pad(seq, ((0, 0), (0, n)))
    # The n-1 most recent tokens; for t < n-2 the slice start clamps, but then no j is valid.
    suffix = jax.lax.dynamic_slice_in_dim(seq, t - (n - 2), n - 1, axis=1) if n > 1 else seq[:, :0]
    match = jnp.ones((b, length), bool)
    for k in range(n - 1):
        match &= padded[:, k : k + length] == suffix[:, k : k + 1]
    match &= (jnp.arange(length) + n - 1 <= t)[None, :]
    follower = padded[:, n - 1 : n - 1 + length]  # the token that completed each earlier n-gram
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], follower.shape)
    return jnp.zeros((b, vocab), bool).at[rows, follower].max(match)


def _process(logits: jax.Array, s: Settings, ids: dict, t: jax.Array, seq: jax.Array, seen: jax.Array) -> jax.Array:
    """Model-level constraints applied to float32 logits [B, V] before choosing step t's token.

    seq [B, L+1] (bos + generated so far), seen bool [B, V] (tokens generated so far).
    """
    if s.repetition_penalty != 1.0:
        penalised = jnp.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
        logits = jnp.where(seen, penalised, logits)
    vocab = logits.shape[-1]
    banned = jnp.zeros((vocab,), bool).at[jnp.array([ids["pad"], ids["bos"]])].set(True)[None]
    banned = banned | ((jnp.arange(vocab) == ids["eos"]) & (t < s.min_len))[None]
    if s.no_repeat_ngram:
        banned = banned | _ngram_bans(seq, t, s.no_repeat_ngram, vocab)
    return jnp.where(banned, NEG, logits)


def _filter_for_sampling(logits: jax.Array, s: Settings) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus) truncation of logits [B, V]."""
    logits = logits / s.temperature
    if s.top_k:
        kth = jax.lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, NEG, logits)
    if s.top_p < 1.0:
        ordered = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
        probs = jax.nn.softmax(ordered, axis=-1)
        # Keep a token if the mass strictly before it is < top_p: always at least the best one.
        keep = (jnp.cumsum(probs, axis=-1) - probs) < s.top_p
        cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, NEG, logits)
    return logits


def _ids(model) -> dict[str, int]:
    c = model.config
    return {"pad": int(c.pad_id), "bos": int(c.bos_id), "eos": int(c.eos_id)}


# ------------------------------------------------------------------------------------------------
# Cached decoding programs
# ------------------------------------------------------------------------------------------------


def _greedy_or_sample(model, s: Settings, inputs: jax.Array, keys: jax.Array) -> jax.Array:
    ids, b, length = _ids(model), inputs.shape[0], s.max_len
    cross_kv, cache = model.start_decoding(inputs, length)
    vocab = model.config.vocab_size
    seq = jnp.full((b, length + 1), ids["pad"], jnp.int32).at[:, 0].set(ids["bos"])
    init = (jnp.int32(0), seq, jnp.zeros((b,), bool), jnp.zeros((b, vocab), bool), cache)

    def cond(state):
        t, _, done, _, _ = state
        return (t < length) & ~jnp.all(done)

    def body(state):
        t, seq, done, seen, cache = state
        token = jax.lax.dynamic_slice_in_dim(seq, t, 1, axis=1)  # [B, 1]
        logits, cache = model.decode_step(token, t, cache, cross_kv)
        logits = _process(logits[:, 0].astype(jnp.float32), s, ids, t, seq, seen)
        if s.method == "sample":
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, t)
            nxt = jax.vmap(jax.random.categorical)(step_keys, _filter_for_sampling(logits, s))
        else:
            nxt = jnp.argmax(logits, axis=-1)
        nxt = jnp.where(done, ids["pad"], nxt).astype(jnp.int32)
        seq = jax.lax.dynamic_update_slice_in_dim(seq, nxt[:, None], t + 1, axis=1)
        seen = seen.at[jnp.arange(b), nxt].set(True)
        return t + 1, seq, done | (nxt == ids["eos"]), seen, cache

    _, seq, _, _, _ = jax.lax.while_loop(cond, body, init)
    return seq[:, 1:]


def _beam_search(model, s: Settings, inputs: jax.Array) -> jax.Array:
    """Beam search keeping finished hypotheses in the beam with a frozen score.

    Each step scores every continuation of every beam (a finished beam may only continue with
    pad at no cost), ranks by log-prob / length**length_penalty and keeps the best K. With
    K = 1 this is exactly greedy decoding.
    """
    ids, b, k, length = _ids(model), inputs.shape[0], s.beam_size, s.max_len
    vocab = model.config.vocab_size
    cross_kv, cache = model.start_decoding(inputs, length)
    # Beams are folded into the batch dim: row b*K + j is beam j of input b. The input is
    # encoded once and repeated; only the self-attention caches differ between beams.
    repeat = lambda x: jnp.repeat(x, k, axis=0)  # noqa: E731
    cross_kv, cache = jax.tree.map(repeat, (cross_kv, cache))
    seq = jnp.full((b * k, length + 1), ids["pad"], jnp.int32).at[:, 0].set(ids["bos"])
    # Only beam 0 is alive at first, so the first step does not pick K copies of one token.
    scores = jnp.full((b, k), NEG, jnp.float32).at[:, 0].set(0.0)
    init = (jnp.int32(0), seq, scores, jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), bool),
            jnp.zeros((b * k, vocab), bool), cache)
    pad_only = jnp.where(jnp.arange(vocab) == ids["pad"], 0.0, NEG)

    def norm(score, lengths):
        if s.length_penalty == 0.0:
            return score
        return score / jnp.maximum(lengths, 1).astype(jnp.float32) ** s.length_penalty

    def cond(state):
        t, _, _, _, done, _, _ = state
        return (t < length) & ~jnp.all(done)

    def body(state):
        t, seq, scores, lengths, done, seen, cache = state
        token = jax.lax.dynamic_slice_in_dim(seq, t, 1, axis=1)
        logits, cache = model.decode_step(token, t, cache, cross_kv)
        logits = _process(logits[:, 0].astype(jnp.float32), s, ids, t, seq, seen)
        logp = jax.nn.log_softmax(logits, axis=-1).reshape(b, k, vocab)
        logp = jnp.where(done[..., None], pad_only, logp)
        cand = scores[..., None] + logp  # [B, K, V]
        cand_len = jnp.where(done, lengths, t + 1)[..., None]
        _, flat = jax.lax.top_k(norm(cand, cand_len).reshape(b, k * vocab), k)  # [B, K]
        parent, tok = flat // vocab, (flat % vocab).astype(jnp.int32)
        new_scores = jnp.take_along_axis(cand.reshape(b, k * vocab), flat, axis=1)
        parent_done = jnp.take_along_axis(done, parent, axis=1)
        new_lengths = jnp.where(parent_done, jnp.take_along_axis(lengths, parent, axis=1), t + 1)
        rows = (jnp.arange(b)[:, None] * k + parent).reshape(-1)  # parent's flat row
        seq, seen, cache = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), (seq, seen, cache))
        tok = jnp.where(parent_done, ids["pad"], tok).reshape(-1)
        seq = jax.lax.dynamic_update_slice_in_dim(seq, tok[:, None], t + 1, axis=1)
        seen = seen.at[jnp.arange(b * k), tok].set(True)
        done = parent_done | (tok == ids["eos"]).reshape(b, k)
        return t + 1, seq, new_scores, new_lengths, done, seen, cache

    _, seq, scores, lengths, _, _, _ = jax.lax.while_loop(cond, body, init)
    best = jnp.argmax(norm(scores, lengths), axis=1)  # [B]
    return seq.reshape(b, k, length + 1)[jnp.arange(b), best, 1:]


def _run_cached(graphdef, s: Settings, state, inputs, keys):
    TRACE_COUNTS["cached"] += 1
    model = nnx.merge(graphdef, state)
    if s.method == "beam":
        return _beam_search(model, s, inputs)
    return _greedy_or_sample(model, s, inputs, keys)


def _run_uncached(graphdef, s: Settings, state, inputs):
    TRACE_COUNTS["uncached"] += 1
    model = nnx.merge(graphdef, state)
    ids, b, length = _ids(model), inputs.shape[0], s.max_len
    context = model.decode_context(inputs)
    seq = jnp.full((b, length + 1), ids["pad"], jnp.int32).at[:, 0].set(ids["bos"])
    vocab = model.config.vocab_size

    def body(t, state):
        seq, done, seen = state
        # The whole static-length prefix (positions 0 .. L-1) every step; causality makes the
        # not-yet-written pads irrelevant to position t.
        logits = model.decode_logits(context, seq[:, :length])
        logits = jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False)
        nxt = jnp.argmax(_process(logits.astype(jnp.float32), s, ids, t, seq, seen), axis=-1)
        nxt = jnp.where(done, ids["pad"], nxt).astype(jnp.int32)
        seq = jax.lax.dynamic_update_slice_in_dim(seq, nxt[:, None], t + 1, axis=1)
        return seq, done | (nxt == ids["eos"]), seen.at[jnp.arange(b), nxt].set(True)

    seq, _, _ = jax.lax.fori_loop(0, length, body, (seq, jnp.zeros((b,), bool), jnp.zeros((b, vocab), bool)))
    return seq[:, 1:]


_cached_program = jax.jit(_run_cached, static_argnums=(0, 1))
_uncached_program = jax.jit(_run_uncached, static_argnums=(0, 1))


def _per_example_keys(rng: Any, batch: int) -> jax.Array:
    """One PRNG key per example from a seed, a key, or already [B] keys."""
    if isinstance(rng, (int, np.integer)):
        rng = jax.random.key(rng)
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)  # legacy uint32 keys
    if rng.ndim == 0:
        return jax.random.split(rng, batch)
    if rng.shape != (batch,):
        raise ValueError(f"rng must be one key or {batch} keys (one per input), got shape {rng.shape}")
    return rng


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------


def generate(model: nnx.Module, inputs: jax.Array, *, rng: Any = None, **settings: Any) -> jax.Array:
    """Decodes from inputs [B, ...] (images [B, H, W, 3] for a captioner, source tokens [B, S]
    for the upsampler) -> int32 tokens [B, max_len] (no bos; eos, then pad).

    settings: the fields of `Settings` (max_len=32, method="greedy", beam_size=4, top_k=0,
    top_p=1.0, temperature=1.0, min_len=0, repetition_penalty=1.0, no_repeat_ngram=0,
    length_penalty=0.0). `rng` (method="sample" only, required there): an int seed, a PRNG key,
    or [B] keys; with [B] keys each output depends only on its own key, so a resumed or
    re-sharded job that derives keys from example ids reproduces the same captions.
    """
    s = Settings(**settings)
    s.validate()
    if s.method == "sample":
        if rng is None:
            raise ValueError("method='sample' needs rng (a seed or a PRNG key).")
        keys = _per_example_keys(rng, inputs.shape[0])
    else:
        keys = jax.random.split(jax.random.key(0), inputs.shape[0])  # unused; fixed signature
    graphdef, state = nnx.split(model)
    return _cached_program(graphdef, s, state, inputs, keys)


def generate_uncached(
    model: nnx.Module,
    inputs: jax.Array,
    *,
    max_len: int = 32,
    min_len: int = 0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram: int = 0,
) -> jax.Array:
    """Reference greedy decoding without a cache: the full forward pass over the static-length
    prefix at every step (O(L^2) work). Same output format and constraints as `generate`."""
    s = Settings(max_len=max_len, min_len=min_len, repetition_penalty=repetition_penalty,
                 no_repeat_ngram=no_repeat_ngram)
    s.validate()
    graphdef, state = nnx.split(model)
    return _uncached_program(graphdef, s, state, inputs)
