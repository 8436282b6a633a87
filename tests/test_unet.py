"""The T2I networks: convolution implementations, the UNet, the T5-style encoder, the composite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dalle3_jax import models, sharding
from dalle3_jax.models import t2i, t5, unet


@pytest.fixture(scope="module")
def tiny_t2i():
    return t2i.create(t2i.config("tiny"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (1, 1)])
def test_im2col_conv_equals_xla_conv(k, stride):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, 8, 8, 5))
    kernel = jax.random.normal(kw, (k, k, 5, 7))
    want = unet.conv2d(x, kernel, stride, "xla")
    got = unet.conv2d(x, kernel, stride, "im2col")
    assert got.shape == want.shape == (2, 8 // stride, 8 // stride, 7)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="conv_impl"):
        unet.conv2d(x, kernel, stride, "fft")


def test_unet_shapes_zero_init_and_gradients():
    cfg = unet.config("tiny", context_dim=12, cond_dim=6)
    model = unet.create(cfg)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    ctx, mask, cond = jnp.ones((2, 5, 12)), jnp.array([[1, 1, 1, 0, 0]] * 2, bool), jnp.ones((2, 6))

    @nnx.jit
    def out_and_grads(m):
        def loss(m):
            out = m(x, jnp.array([0.0, 999.0]), ctx, mask, cond)
            return jnp.mean((out - 1.0) ** 2), out

        return nnx.grad(loss, has_aux=True)(m)

    grads, out = out_and_grads(model)
    assert out.shape == x.shape and out.dtype == jnp.float32
    # The output conv starts at zero, so a fresh UNet predicts exactly 0 ...
    assert float(jnp.max(jnp.abs(out))) == 0.0
    # ... yet the loss still reaches it, and through it the network learns.
    assert float(jnp.abs(grads.conv_out.kernel[...]).sum()) > 0
    with pytest.raises(ValueError, match="divisible"):
        unet.create(unet.config("tiny", image_size=31))
    with pytest.raises(KeyError, match="Unknown UNet config field"):
        unet.config("tiny", chanels=4)


def test_every_weight_has_logical_axis_names(tiny_t2i):
    params = nnx.state(tiny_t2i, nnx.Param)
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda v: isinstance(v, nnx.Variable))
    assert leaves
    for path, var in leaves:
        names = sharding.names_of(var)
        assert names is not None and len(names) == var.get_value().ndim, (jax.tree_util.keystr(path), names)


def test_relative_position_buckets():
    rel = jnp.arange(-200, 201)
    b = np.asarray(t5.relative_position_bucket(rel, 32, 128))
    assert b.min() >= 0 and b.max() < 32
    # Exact for short distances, one bucket per sign beyond max_distance, monotone in distance.
    assert len(set(b[(rel >= -7) & (rel <= 7)])) == 15
    assert len(set(b[rel >= 128])) == 1 and len(set(b[rel <= -128])) == 1
    pos = b[rel > 0]
    assert np.all(np.diff(pos) >= 0) and set(pos).isdisjoint(set(b[rel <= 0]))


def test_t5_encoding_ignores_padding():
    enc = t5.create(t5.config("tiny", vocab_size=64), rngs=nnx.Rngs(1))
    run = nnx.jit(lambda e, tokens: e(tokens))
    short = jnp.array([[1, 9, 17, 33, 2, 0], [1, 17, 9, 33, 2, 0]])
    long = jnp.pad(short, ((0, 0), (0, 4)))
    a, b = run(enc, short), run(enc, long)
    assert a.states.shape == (2, 6, 32) and a.pooled.shape == (2, 32)
    np.testing.assert_allclose(a.states[:, :5], b.states[:, :5], atol=1e-5)
    np.testing.assert_allclose(a.pooled, b.pooled, atol=1e-5)
    assert a.mask.tolist() == [[True] * 5 + [False]] * 2
    # Word order matters (relative positions), unlike for a bag of words.
    assert float(jnp.max(jnp.abs(a.pooled[1] - a.pooled[0]))) > 1e-4


def test_t2i_text_changes_the_prediction(tiny_t2i):
    model = nnx.clone(tiny_t2i)
    # Give the zero-initialised output conv weights so the prediction depends on its input.
    kernel = model.unet.conv_out.kernel
    kernel.set_value(0.1 * jax.random.normal(jax.random.key(2), kernel.get_value().shape))
    x = jax.random.normal(jax.random.key(3), (3, 32, 32, 3))
    x = x.at[2].set(x[1])
    tokens = jnp.array([[1, 40, 41, 2, 0], [1, 40, 41, 2, 0], [1, 77, 41, 2, 0]])
    run = nnx.jit(lambda m, x, tok: m(x, jnp.full((3,), 500.0), tok))
    out = run(model, x, tokens)
    # Rows 1 and 2 share the noisy image and differ by one word of the caption.
    assert float(jnp.max(jnp.abs(out[1] - out[2]))) > 1e-4
    # Batching does not mix examples: row 1 is unchanged when row 0 is another example.
    other = run(model, x.at[0].set(-x[0]), tokens.at[0].set(jnp.array([1, 5, 6, 7, 2])))
    np.testing.assert_allclose(other[1], out[1], atol=1e-5)
    assert float(jnp.max(jnp.abs(other[0] - out[0]))) > 1e-4


def test_registry_and_recipe_size():
    assert {"t5", "unet", "t2i"} <= set(models.names())
    assert models.variants("unet") == ("tiny", "S", "B")
    recipe = nnx.eval_shape(lambda: models.get("unet", models.config("unet", "S")))
    # The recipe: a ~1.2M-parameter UNet with channels 16/32/64.
    assert 1.1e6 < models.param_count(recipe) < 1.4e6


@pytest.mark.parametrize("scale", [0.02, 0.5])
def test_token_bag_init_sets_the_embedding_scale(scale):
    cfg = t2i.config("tiny", token_bag_init=scale)
    model = t2i.create(cfg, rngs=nnx.Rngs(0))
    table = np.asarray(model.token_bag[...])
    assert table.shape == (cfg.vocab_size, model.text.width)
    assert abs(float(table.std()) / scale - 1.0) < 0.05
    with pytest.raises(KeyError, match="token_bag_scale"):
        t2i.config("tiny", token_bag_scale=scale)  # a misspelt field is refused, not ignored
