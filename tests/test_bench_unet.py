"""benchmarks/bench_unet.py without running it (minutes on 2 cores): its FLOP counter, and that
our UNet and the diffusers peer are configured alike. The diffusers side needs its own venv."""

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from dalle3_jax import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for `benchmarks.common`, as the benchmark scripts themselves do


def _load(name, *parts):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, *parts))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_matmul_flops_counts_dots_convs_and_scans():
    from benchmarks import common

    x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
    assert common.matmul_flops(lambda x, w: x @ w, x, w) == 2 * 4 * 8 * 16
    img, k = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 5))
    conv = lambda i, k: jax.lax.conv_general_dilated(i, k, (1, 1), "SAME",  # noqa: E731
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert common.matmul_flops(conv, img, k) == 2 * (2 * 6 * 6 * 5) * (3 * 3 * 3)

    def scanned(x, w):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=3)[0]

    assert common.matmul_flops(scanned, x, jnp.ones((8, 8))) == 3 * 2 * 4 * 8 * 8
    # Gradients count too: the backward pass of a dot is one more dot per differentiated input.
    loss = lambda x, w: jnp.sum(x @ w)  # noqa: E731
    assert common.matmul_flops(jax.grad(loss, argnums=(0, 1)), x, w) == 3 * 2 * 4 * 8 * 16
    assert common.matmul_flops(jax.grad(loss, argnums=1), x, w) == 2 * 2 * 4 * 8 * 16


def test_our_unet_matches_the_peer_configuration():
    bench = _load("bench_unet", "benchmarks", "bench_unet.py")
    peer = _load("diffusers_unet", "benchmarks", "peers", "diffusers_unet.py")
    a = bench.parse_args([])
    cfg = bench.unet_config(a, "xla")
    kw = peer.model_kwargs(peer.parse_args([]))
    assert tuple(cfg.base_channels * m for m in cfg.channel_mult) == kw["block_out_channels"] == (64, 128, 128)
    assert cfg.num_res_blocks == kw["layers_per_block"] == 2
    assert cfg.context_dim == kw["cross_attention_dim"] == 256 and cfg.groups == kw["norm_num_groups"]
    # Attention where diffusers has cross-attention blocks: every level but the first, and the middle.
    assert cfg.attn_resolutions == (16, 8) and cfg.mid_attention
    assert kw["down_block_types"] == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert 128 // cfg.head_dim == kw["attention_head_dim"] == 8  # diffusers' name for the head count
    n = models.param_count(nnx.eval_shape(lambda: models.get("unet", cfg)))
    # diffusers' model has 10,429,315 parameters; ours lacks its attention in/out projections and
    # feed-forward gates.
    assert 9.0e6 < n < 10.43e6
    with pytest.raises(SystemExit, match="multiple of the first"):
        bench.unet_config(bench.parse_args(["--channels", "64,96"]), "xla")
