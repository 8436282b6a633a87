"""Caption decoding: the KV-cached decoders against the uncached reference, and every option."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from dalle3_jax import sharding
from dalle3_jax.models import coca
from dalle3_jax.recaption import decode

CFG = dict(image_size=16, patch_size=4, vit_width=32, vit_depth=1, vit_heads=2, n_caption_queries=4, pool_heads=2,
           vocab_size=48, max_text_len=16, text_width=32, text_heads=2, unimodal_layers=1, multimodal_layers=1,
           embed_dim=16)
PAD, BOS, EOS = 0, 1, 2
MAX_LEN = 10
# Class c of the toy task: a flat colour image, captioned by a fixed sequence of varying length.
CAPTIONS = [[10, 11, 12], [20, 21, 22, 23, 24], [30, 31], [40, 41, 42, 43]]


def toy_data():
    colours = np.array([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]], np.float32)
    classes = np.arange(8) % 4
    noise = np.random.default_rng(0).normal(0, 0.1, size=(8, 16, 16, 3)).astype(np.float32)
    images = colours[classes][:, None, None, :] + noise
    tokens = np.zeros((8, 8), np.int32)
    for i, c in enumerate(classes):
        row = [BOS] + CAPTIONS[c] + [EOS]
        tokens[i, : len(row)] = row
    return images, tokens, classes


@pytest.fixture(scope="module")
def random_model():
    return coca.create(coca.config("tiny", **CFG), rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def images():
    return jax.random.uniform(jax.random.key(3), (8, 16, 16, 3), minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def trained():
    """A captioner overfit on the toy task (a few seconds), so it emits eos at varied places."""
    model = coca.create(coca.config("tiny", **CFG), rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    images, tokens, classes = toy_data()
    batch = {"image": images, "tokens": tokens}

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(lambda m: coca.loss_fn(m, batch, w_con=0.0, w_cap=1.0)[0])(model)
        opt.update(model, grads)
        return loss

    for _ in range(40):
        loss = step(model, opt)
    assert float(loss) < 0.1, float(loss)
    return model, images, classes


def check_format(tokens):
    """Every row: no bos, no pad before eos, only pad after the first eos."""
    tokens = np.asarray(tokens)
    assert tokens.dtype == np.int32 and not np.any(tokens == BOS)
    for row in tokens:
        eos = np.flatnonzero(row == EOS)
        end = eos[0] if len(eos) else len(row)
        assert np.all(row[:end] != PAD), row
        assert np.all(row[end + 1 :] == PAD), row


def test_cached_greedy_matches_uncached_random_init(random_model, images):
    cached = decode.generate(random_model, images, max_len=MAX_LEN)
    reference = decode.generate_uncached(random_model, images, max_len=MAX_LEN)
    assert cached.shape == (8, MAX_LEN)
    np.testing.assert_array_equal(cached, reference)
    check_format(cached)


def test_cached_greedy_matches_uncached_without_caption_pooler(images):
    # n_caption_queries = 0: the decoder cross-attends to every image token.
    model = coca.create(coca.config("tiny", **{**CFG, "n_caption_queries": 0}), rngs=nnx.Rngs(2))
    assert model.caption_pool is None
    cached = decode.generate(model, images, max_len=MAX_LEN)
    np.testing.assert_array_equal(cached, decode.generate_uncached(model, images, max_len=MAX_LEN))


def test_cached_greedy_matches_uncached_trained(trained):
    model, images, classes = trained
    cached = np.asarray(decode.generate(model, images, max_len=MAX_LEN))
    np.testing.assert_array_equal(cached, decode.generate_uncached(model, images, max_len=MAX_LEN))
    # The trained model says its caption, then eos, then pads.
    for row, c in zip(cached, classes):
        want = CAPTIONS[c] + [EOS]
        assert list(row) == want + [PAD] * (MAX_LEN - len(want))
    # Constraints go through the same code on both paths.
    kw = dict(max_len=MAX_LEN, min_len=5, no_repeat_ngram=2, repetition_penalty=1.3)
    np.testing.assert_array_equal(decode.generate(model, images, **kw), decode.generate_uncached(model, images, **kw))


def test_beam_one_is_greedy(random_model, trained, images):
    for model, imgs in ((random_model, images), (trained[0], trained[1])):
        greedy = decode.generate(model, imgs, max_len=MAX_LEN)
        beam = decode.generate(model, imgs, max_len=MAX_LEN, method="beam", beam_size=1)
        np.testing.assert_array_equal(beam, greedy)


def test_beam_search(trained):
    model, images, classes = trained
    out = decode.generate(model, images, max_len=MAX_LEN, method="beam", beam_size=3, length_penalty=0.6)
    check_format(out)
    # On a confident model beam search finds the same (best) captions as greedy.
    np.testing.assert_array_equal(out, decode.generate(model, images, max_len=MAX_LEN))


def test_min_len_and_eos(trained):
    model, images, _ = trained
    for method in ("greedy", "beam", "sample"):
        out = np.asarray(decode.generate(model, images, max_len=MAX_LEN, min_len=6, method=method, beam_size=2, rng=0))
        check_format(out)
        assert not np.any(out[:, :6] == EOS), (method, out)
    # Without min_len every caption ends right after its 2-5 words.
    assert np.all(np.argmax(np.asarray(decode.generate(model, images, max_len=MAX_LEN)) == EOS, axis=1) < 6)


def test_top_k_one_is_greedy(random_model, images):
    greedy = decode.generate(random_model, images, max_len=MAX_LEN)
    sampled = decode.generate(random_model, images, max_len=MAX_LEN, method="sample", top_k=1, temperature=2.0, rng=5)
    np.testing.assert_array_equal(sampled, greedy)
    # A tiny nucleus keeps only the most likely token too.
    nucleus = decode.generate(random_model, images, max_len=MAX_LEN, method="sample", top_p=1e-6, rng=5)
    np.testing.assert_array_equal(nucleus, greedy)


def test_sampling_seeds(random_model, images):
    kw = dict(max_len=MAX_LEN, method="sample", temperature=1.5)
    a = decode.generate(random_model, images, rng=jax.random.key(0), **kw)
    b = decode.generate(random_model, images, rng=jax.random.key(0), **kw)
    c = decode.generate(random_model, images, rng=jax.random.key(1), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    check_format(a)
    # Per-example keys: a caption depends on its own key only, not on its batch neighbours.
    keys = jax.random.split(jax.random.key(7), 8)
    full = decode.generate(random_model, images, rng=keys, **kw)
    half = decode.generate(random_model, images[4:], rng=keys[4:], **kw)
    np.testing.assert_array_equal(full[4:], half)
    with pytest.raises(ValueError, match="needs rng"):
        decode.generate(random_model, images, **kw)


def test_no_repeat_ngram(random_model, images):
    plain = np.asarray(decode.generate(random_model, images, max_len=MAX_LEN))
    out = np.asarray(decode.generate(random_model, images, max_len=MAX_LEN, no_repeat_ngram=2))

    def bigrams(row):
        row = [BOS] + [t for t in row if t != PAD]
        return list(zip(row, row[1:]))

    assert any(len(set(bigrams(r))) < len(bigrams(r)) for r in plain)  # random init repeats itself
    for row in out:
        assert len(set(bigrams(row))) == len(bigrams(row)), row


def test_compiles_once(random_model, images):
    kw = dict(max_len=MAX_LEN, method="beam", beam_size=2)
    decode.generate(random_model, images, **kw)
    before = dict(decode.TRACE_COUNTS)
    out = decode.generate(random_model, images, **kw)
    decode.generate_uncached(random_model, images, max_len=MAX_LEN)
    decode.generate_uncached(random_model, images, max_len=MAX_LEN)
    assert decode.TRACE_COUNTS["cached"] == before["cached"]
    assert decode.TRACE_COUNTS["uncached"] <= before.get("uncached", 0) + 1
    assert decode._cached_program._cache_size() >= 1
    check_format(out)


def test_sharded_decoding_matches(random_model, images):
    """The recaption job decodes with a sharded model and a batch split over devices."""
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = sharding.create_sharded(lambda: coca.create(coca.config("tiny", **CFG), rngs=nnx.Rngs(1)), mesh)
    with jax.set_mesh(mesh):
        batch = sharding.global_batch({"image": np.asarray(images)}, mesh)["image"]
        out = decode.generate(model, batch, max_len=MAX_LEN, method="beam", beam_size=2)
    assert not out.sharding.is_fully_replicated  # captions stay split like the batch
    expected = decode.generate(random_model, images, max_len=MAX_LEN, method="beam", beam_size=2)
    np.testing.assert_array_equal(out, expected)


def test_settings_are_validated(random_model, images):
    for bad in (dict(method="nucleus"), dict(min_len=20, max_len=10), dict(top_p=0.0), dict(temperature=0.0)):
        with pytest.raises(ValueError):
            decode.generate(random_model, images, **bad)
    with pytest.raises(ValueError, match="max_len"):
        decode.generate(random_model, images, max_len=40)  # beyond the model's position table
