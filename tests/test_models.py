"""CoCa model: shapes, masking, causality, losses, training signal, sharded equivalence."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dalle3_jax import models, sharding
from dalle3_jax.models import coca, layers, text, vit

# Smaller than "tiny" so that every test compiles in about a second on CPU. Widths stay
# divisible by 4 so the fsdp=4 mesh actually splits them.
SMALL = dict(image_size=16, patch_size=4, vit_width=32, vit_depth=1, vit_heads=2, n_caption_queries=4,
             pool_heads=2, vocab_size=64, max_text_len=16, text_width=32, text_heads=2, unimodal_layers=1,
             multimodal_layers=1, embed_dim=16)
B, L = 8, 8  # B = 8 so the 8-device mesh test reuses the 1-device program


def small(**overrides):
    return coca.config("tiny", **{**SMALL, **overrides})


def make_batch(batch=B, length=L, seed=0):
    """Random images and `bos w.. eos pad..` token rows of different lengths (no special ids inside)."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, size=(batch, 16, 16, 3)).astype(np.float32)
    tokens = np.zeros((batch, length), np.int32)
    for i in range(batch):
        n = 2 + i % (length - 3)  # words per caption
        tokens[i, 0] = 1
        tokens[i, 1 : 1 + n] = rng.integers(4, 64, size=n)
        tokens[i, 1 + n] = 2
    return {"image": images, "tokens": tokens}


@pytest.fixture(scope="module")
def model():
    return coca.create(small(), rngs=nnx.Rngs(0))


@nnx.jit(static_argnames=("w_con", "w_cap", "contrastive"))
def jit_loss(model, batch, w_con=1.0, w_cap=1.0, contrastive=None):
    return coca.loss_fn(model, batch, w_con=w_con, w_cap=w_cap, contrastive=contrastive)


def test_registry_and_config():
    assert "coca" in models.names()
    assert models.variants("coca") == ("tiny", "S", "B", "L")
    cfg = models.config("coca", "B")
    assert (cfg.vit_width, cfg.vit_depth, cfg.vit_heads) == (768, 12, 12)
    with pytest.raises(KeyError, match="Unknown CoCa config field"):
        coca.config("tiny", widht=3)
    with pytest.raises(KeyError, match="Unknown model"):
        models.get("nope")
    with pytest.raises(KeyError, match="Unknown CoCa variant"):
        coca.config("XXL")
    m = models.get("coca", small())
    assert isinstance(m, coca.CoCa) and models.param_count(m) > 0


def test_output_shapes(model):
    batch = make_batch()
    f = nnx.jit(lambda m, i, t: (m(i, t), m.encode_image(i), m.encode_text(t)))
    out, (image_embed, queries), text_embed = f(model, batch["image"], batch["tokens"])
    assert out["image_embed"].shape == (B, 16) and out["text_embed"].shape == (B, 16)
    assert out["logits"].shape == (B, L, 64) and out["logits"].dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(out["image_embed"], axis=-1), 1.0, atol=1e-4)
    np.testing.assert_allclose(float(out["logit_scale"]), 1 / 0.07, rtol=1e-5)
    assert queries.shape == (B, 4, 32)
    np.testing.assert_allclose(image_embed, out["image_embed"], atol=1e-5)
    np.testing.assert_allclose(text_embed, out["text_embed"], atol=1e-5)


def test_vit_patchify_and_sincos():
    images = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    patches = vit.patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    # Patch 1 is the top-right 4x4 block, flattened row by row.
    np.testing.assert_array_equal(patches[0, 1], images[0, :4, 4:8].reshape(-1))
    table = vit.sincos_2d(2, 3, 8)
    assert table.shape == (6, 8) and len({tuple(r) for r in table.round(5)}) == 6
    m = vit.ViT(image_size=8, patch_size=4, width=8, depth=1, heads=2, mlp_dim=16, pos_embed="sincos", rngs=nnx.Rngs(0))
    assert m(images).shape == (2, 4, 8)
    assert not any("pos" in str(p) for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param)))


def test_padding_invariance(model):
    batch = make_batch()
    f = nnx.jit(lambda m, b: (m.encode_text(b["tokens"]), coca.loss_fn(m, b)[0]))
    ref_embed, ref_loss = f(model, batch)
    # 1) more trailing padding; 2) junk ids (even eos and words) in every position after eos.
    longer = np.pad(batch["tokens"], ((0, 0), (0, 5)))
    junk = np.array(batch["tokens"])
    after_eos = np.cumsum(junk == 2, axis=1) - (junk == 2) > 0
    junk[after_eos] = np.random.default_rng(1).integers(2, 64, size=after_eos.sum())
    for tokens in (longer, junk):
        embed, loss = f(model, {**batch, "tokens": tokens})
        np.testing.assert_allclose(embed, ref_embed, atol=1e-5)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    np.testing.assert_array_equal(text.token_mask(jnp.asarray(junk), 0, 2), batch["tokens"] != 0)


def test_causality(model):
    rng = np.random.default_rng(2)
    tokens = np.concatenate([np.ones((2, 1), np.int32), rng.integers(4, 64, size=(2, L - 1))], axis=1)
    queries = model.caption_queries(make_batch(2)["image"])
    f = nnx.jit(lambda m, q, t: m.caption_logits(q, t))
    ref = f(model, queries, tokens)
    t = 3
    changed = tokens.copy()
    changed[:, t + 1 :] = rng.integers(4, 64, size=(2, L - t - 1))
    out = f(model, queries, changed)
    np.testing.assert_allclose(out[:, : t + 1], ref[:, : t + 1], atol=1e-5)
    assert not np.allclose(out[:, t + 1 :], ref[:, t + 1 :], atol=1e-3)


def test_captioning_only_skips_contrastive(model):
    batch = make_batch()
    loss, metrics = jit_loss(model, batch, w_con=0.0, w_cap=1.0)
    assert float(metrics["contrastive_loss"]) == 0.0
    np.testing.assert_allclose(float(loss), float(metrics["caption_loss"]), rtol=1e-6)
    # The captioning-only program never touches the contrastive weights: it is traced with them
    # replaced by NaN, and still gives the same finite loss.
    poisoned = nnx.clone(model)
    for pool in (poisoned.contrastive_pool, poisoned.image_proj, poisoned.text_proj):
        for var in jax.tree.leaves(nnx.state(pool, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)):
            var[...] = jnp.full(var.shape, jnp.nan, var.dtype)
    poisoned.text.cls[...] = jnp.full(poisoned.text.cls.shape, jnp.nan)
    np.testing.assert_allclose(float(jit_loss(poisoned, batch, w_con=0.0)[0]), float(loss), rtol=1e-6)
    full_loss, full = jit_loss(model, batch)
    np.testing.assert_allclose(float(full["caption_loss"]), float(metrics["caption_loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(full_loss), float(full["contrastive_loss"] + full["caption_loss"]), rtol=1e-5)


def test_sigmoid_loss():
    m = coca.create(small(contrastive="sigmoid"), rngs=nnx.Rngs(0))
    batch = make_batch()
    f = nnx.jit(lambda m, b: (coca.loss_fn(m, b, w_con=1.0, w_cap=0.0),
                              m.forward(b["image"], b["tokens"], caption=False)))
    (loss, metrics), out = f(m, batch)
    np.testing.assert_allclose(float(metrics["logit_scale"]), 10.0, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["logit_bias"]), -10.0)
    z = 10.0 * np.asarray(out["image_embed"]) @ np.asarray(out["text_embed"]).T - 10.0
    sign = 2 * np.eye(B) - 1
    expected = np.mean(np.sum(np.log1p(np.exp(-sign * z)), axis=1))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
    assert float(metrics["caption_loss"]) == 0.0


def test_bfloat16_compute():
    m = coca.create(small(dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert m.text.token_embed[...].dtype == jnp.float32
    loss, metrics = jit_loss(m, make_batch())
    ref, _ = jit_loss(coca.create(small(), rngs=nnx.Rngs(0)), make_batch())
    assert np.isfinite(float(loss)) and abs(float(loss) - float(ref)) < 0.1 * float(ref)


def test_overfits_fixed_batch():
    m = coca.create(small(), rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(m, optax.adam(3e-3), wrt=nnx.Param)
    batch = make_batch()

    @nnx.jit
    def step(m, opt, batch):
        (loss, metrics), grads = nnx.value_and_grad(lambda m: coca.loss_fn(m, batch), has_aux=True)(m)
        opt.update(m, grads)
        return loss, metrics

    losses = [float(step(m, opt, batch)[0]) for _ in range(25)]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


def _spec(x):
    return tuple(x.get_value().sharding.spec)


def test_sharded_matches_single_device(model):
    batch = make_batch()
    ref_loss, ref = jit_loss(model, batch)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    m = sharding.create_sharded(lambda: coca.create(small(), rngs=nnx.Rngs(0)), mesh)
    with jax.set_mesh(mesh):
        loss, metrics = jit_loss(m, sharding.global_batch(batch, mesh))
    assert metrics["contrastive_loss"].sharding.is_fully_replicated
    np.testing.assert_allclose(float(loss), float(ref_loss), atol=1e-5)
    np.testing.assert_allclose(float(metrics["contrastive_loss"]), float(ref["contrastive_loss"]), atol=1e-5)
    # Weights are really split over fsdp (not replicated), and tiny norms stay replicated.
    assert "fsdp" in _spec(m.text.token_embed) and "fsdp" in _spec(m.vision.blocks[0].mlp.wi.kernel)
    assert "fsdp" in _spec(m.text.multimodal[0].cross_attn.key.kernel)
    assert all(a is None for a in _spec(m.vision.norm.scale))


def test_attention_cache_matches_full():
    attn = layers.Attention(16, 2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    full = attn(x, mask=layers.causal_mask(5))
    cache = attn.init_cache(2, 8, jnp.float32)
    steps = []
    for t in range(5):
        y, cache = attn.decode(x[:, t : t + 1], jnp.int32(t), cache)
        steps.append(y)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)
    # A 3-token prefill followed by single steps gives the same result.
    cache = attn.init_cache(2, 8, jnp.float32)
    y3, cache = attn.decode(x[:, :3], jnp.int32(0), cache)
    y4, cache = attn.decode(x[:, 3:4], jnp.int32(3), cache)
    np.testing.assert_allclose(jnp.concatenate([y3, y4], axis=1), full[:, :4], atol=1e-5)


def test_conv_stem_covers_the_same_pixels_and_shards():
    cfg = small(vit_stem=(8, 16))
    m = coca.create(cfg, rngs=nnx.Rngs(0))
    batch = make_batch()
    out = m(batch["image"], batch["tokens"])
    # Two stride-2 convs then 1x1 "patches": still (16 / 4)^2 = 16 image tokens.
    assert m.vision(batch["image"]).shape == (B, 16, 32)
    assert out["logits"].shape == (B, L, 64)
    with pytest.raises(ValueError, match="not divisible by the conv stem"):
        coca.create(small(vit_stem=(8, 8, 8)), rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    sharded = sharding.create_sharded(lambda: coca.create(cfg, rngs=nnx.Rngs(0)), mesh)
    with jax.set_mesh(mesh):
        loss, _ = jit_loss(sharded, sharding.global_batch(batch, mesh))
    np.testing.assert_allclose(float(loss), float(jit_loss(m, batch)[0]), atol=1e-5)
