"""T2I UNet speed: our UNet vs diffusers' UNet2DConditionModel at matched dimensions, in one run.

    python benchmarks/bench_unet.py --json             # one JSON object (the benchmark report)
    python benchmarks/bench_unet.py --quick            # fewer timed iterations, a table
    python benchmarks/bench_unet.py --json --no-peer   # our side only

Default dimensions (the issue's 10.4M-parameter diffusers UNet): 32 px RGB, channels
64/128/128, two ResBlocks per level (three on the way up), attention at 16 and 8 px and in the
bottleneck, 8 heads, an MLP of 4x width after each cross-attention (diffusers' transformer
blocks have a GEGLU feed-forward of that width), GroupNorm with 32 groups, text states
[B, 32, 256], batch 64, float32. Our UNet ("B" variant) has no pooled-text input here (diffusers'
has none); the designs still differ in the details (diffusers projects in and out of every
attention block and gates its feed-forward), which the parameter counts and FLOPs below show.

Measured (median seconds per call after warm-up; compile time excluded):
  train_images_per_s      batch / one AdamW step (forward, MSE against a target, backward,
                          clipping to norm 1, update) with the project's loop.compile_train_step
                          on a 1-device mesh, with XLA's convolution (the default conv_impl)
  train_images_per_s_im2col     the same step with convolutions as im2col + one matmul
  sample_images_per_s     images per second per sampler step: batch x steps / seconds of a
                          jitted DDIM run (samplers.sample_loop) with classifier-free guidance,
                          i.e. two UNet evaluations (cond + uncond, one batch) per step
  diffusers_*             benchmarks/peers/diffusers_unet.py in its own venv (torch==2.13.0,
                          diffusers; created under .bench_venvs/diffusers on first use)
  conv3x3_gflops          one forward 3x3 convolution [64, 16, 16, 128] -> 128 channels, XLA's
                          convolution against im2col + matmul

FLOPs are those of the matmuls and convolutions of one forward + backward pass, counted from
the traced im2col program (common.matmul_flops); diffusers' from torch.utils.flop_counter over the
same pass. MFU = model FLOP/s / the float32 matmul peak measured in this run (jnp.dot; torch's
own peak is reported beside it). The numbers are noisy on a shared machine: the report carries
the 1-minute load average at the start.

Measured on the 2-core CPU this was written on, with a load average of 5-6 from other jobs (so
each side got roughly a third of the machine, one after the other): ours 3.9 images/s (MFU 0.31
of a 148 GFLOP/s matmul peak; im2col 3.2 images/s), diffusers 2.7 images/s (MFU 0.21): 1.48x;
sampling 7.7 image-steps/s with guidance. The 3x3 convolution alone: XLA 139 GFLOP/s, im2col 54.
(The issue measured diffusers at about 11 images/s on the idle machine.) A run takes about 12
minutes, most of it the two sides' train steps at ~20 s each.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PEER_SCRIPT = os.path.join(ROOT, "benchmarks", "peers", "diffusers_unet.py")
DEFAULT_PEER_VENV = os.path.join(ROOT, ".bench_venvs", "diffusers")
PEER_PACKAGES = ("torch==2.13.0", "diffusers")


def log(msg: str) -> None:
    print(f"[bench_unet] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    from benchmarks import common

    p = common.peer_bench_parser(__doc__, "diffusers", DEFAULT_PEER_VENV)
    dims = p.add_argument_group("dimensions (both models)")
    dims.add_argument("--channels", default="64,128,128", help="channels per level, comma-separated")
    for name, default in [("image-size", 32), ("layers", 2), ("context-dim", 256), ("context-len", 32), ("heads", 8),
                          ("groups", 32), ("mlp-ratio", 4), ("batch", 64)]:
        dims.add_argument(f"--{name}", type=int, default=default)
    it = p.add_argument_group("iterations")
    it.add_argument("--warmup", type=int, default=1, help="untimed train steps (the first also compiles)")
    it.add_argument("--train-iters", type=int, default=4, help="timed train steps, each side and conv impl")
    it.add_argument("--sample-steps", type=int, default=5, help="DDIM steps of each timed sampling run")
    it.add_argument("--sample-iters", type=int, default=2, help="timed sampling runs")
    it.add_argument("--peak-size", type=int, default=2048, help="side of the matmul peak probe")
    a = p.parse_args(argv)
    if a.quick:
        a.warmup, a.train_iters, a.sample_iters = 1, 2, 1
    a.channel_list = tuple(int(c) for c in a.channels.split(","))
    return a


def unet_config(a: argparse.Namespace, conv_impl: str):
    from dalle3_jax.models import unet

    base = a.channel_list[0]
    if any(c % base for c in a.channel_list):
        raise SystemExit(f"error: --channels {a.channels}: every level must be a multiple of the first")
    sizes = [a.image_size // 2**i for i in range(len(a.channel_list))]
    width = a.channel_list[-1]
    return unet.config("B", image_size=a.image_size, base_channels=base,
                       channel_mult=tuple(c // base for c in a.channel_list), num_res_blocks=a.layers,
                       attn_resolutions=tuple(sizes[1:]), self_attn_resolutions=tuple(sizes[1:]),
                       mid_attention=True, attn_mlp_ratio=a.mlp_ratio,
                       head_dim=width // a.heads, context_dim=a.context_dim, cond_dim=0, groups=a.groups,
                       conv_impl=conv_impl)


def host_batch(a: argparse.Namespace, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    s = a.image_size
    return {"x": rng.normal(size=(a.batch, s, s, 3)).astype(np.float32),
            "t": rng.integers(0, 1000, a.batch).astype(np.float32),
            "context": rng.normal(size=(a.batch, a.context_len, a.context_dim)).astype(np.float32),
            "target": rng.normal(size=(a.batch, s, s, 3)).astype(np.float32)}


def _loss(model, batch, rng=None):
    import jax.numpy as jnp

    mask = jnp.ones(batch["context"].shape[:2], bool)
    out = model(batch["x"], batch["t"], batch["context"], mask)
    return jnp.mean(jnp.square(out - batch["target"])), {}


def bench_train(a: argparse.Namespace, conv_impl: str, mesh) -> dict:
    import jax
    from flax import nnx

    from benchmarks import common
    from dalle3_jax import optim, sharding
    from dalle3_jax.models import unet
    from dalle3_jax.trainers import loop, t2i

    cfg = unet_config(a, conv_impl)
    optim_cfg = t2i.default_config().optim  # the T2I recipe's optimizer
    tx = optim.make_optimizer(optim_cfg, a.warmup + a.train_iters)
    task = loop.Task(make_model=lambda: unet.create(cfg), loss_fn=_loss, train_data=lambda: None,
                     batch_keys=("x", "t", "context", "target"))
    ts = sharding.create_sharded(lambda: loop.TrainState(task.make_model(), tx), mesh)
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in host_batch(a).items()}
    start = time.perf_counter()
    _, step, _ = loop.compile_train_step(task, ts, batch, jax.random.key(0))
    log(f"ours ({conv_impl}): {optim.count_params(ts.model):,} parameters; compiled in "
        f"{time.perf_counter() - start:.1f}s; {a.warmup} warm-up + {a.train_iters} timed steps at batch {a.batch}")
    graphdef, params = nnx.split(ts.model)
    flops = common.matmul_flops(lambda p, b: jax.grad(lambda p: _loss(nnx.merge(graphdef, p), b)[0])(p),
                                params, batch)
    state = nnx.state(ts)

    def train_step():
        nonlocal state
        state, metrics = step(state, batch, jax.random.key(0))  # donated: keep only the new state
        return state, metrics

    seconds = common.time_calls(train_step, a.train_iters, a.warmup)
    nnx.update(ts, state)
    return {"seconds": seconds, "flops_per_image": flops / a.batch, "params": optim.count_params(ts.model),
            "model": ts.model}


def bench_sampling(a: argparse.Namespace, model, guidance: float = 3.0) -> list[float]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks import common
    from dalle3_jax.diffusion import samplers, schedules

    schedule = schedules.make("cosine", 1000, zero_terminal_snr=True)
    coeffs = samplers.coefficients(schedule, "ddim", a.sample_steps)
    graphdef, state = nnx.split(model)
    b = host_batch(a, seed=1)
    context = jnp.asarray(b["context"])
    null = jnp.zeros_like(context)  # an "empty caption" stand-in for the unconditional half
    both, mask = jnp.concatenate([context, null]), jnp.ones((2 * a.batch, a.context_len), bool)

    @jax.jit
    def run(state, x, rng):
        m = nnx.merge(graphdef, state)

        def denoise(x, t):
            out = m(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both, mask)
            return samplers.guided(out[:a.batch], out[a.batch:], guidance)

        return samplers.sample_loop(denoise, x, coeffs, rng, prediction="v", clip_x0=True)

    x = jnp.asarray(b["x"])
    log(f"ours: DDIM sampling, {a.sample_steps} steps with guidance, batch {a.batch}, 1 warm-up + "
        f"{a.sample_iters} timed runs")
    return common.time_calls(lambda: run(state, x, jax.random.key(0)), a.sample_iters, warmup=1)


def bench_conv(a: argparse.Namespace) -> dict:
    """Forward GFLOP/s of one 3x3 convolution, XLA's against im2col + matmul."""
    import jax

    from benchmarks import common
    from dalle3_jax.models import unet

    c = a.channel_list[-1]
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (a.batch, a.image_size // 2, a.image_size // 2, c))
    w = jax.random.normal(kw, (3, 3, c, c))
    flops = 2.0 * x.size * 9 * c
    out = {}
    for impl in unet.CONV_IMPLS:
        fn = jax.jit(lambda x, w, impl=impl: unet.conv2d(x, w, 1, impl))
        out[impl] = flops / common.median(common.time_calls(lambda: fn(x, w), iters=5, warmup=1)) / 1e9
    return out


def main(argv=None) -> dict:
    a = parse_args(argv)
    import jax

    from benchmarks import common
    from dalle3_jax import sharding

    load = os.getloadavg()[0]
    peak = common.matmul_peak_flops(a.peak_size)
    log(f"matmul peak (jnp.dot {a.peak_size}^3, float32): {peak / 1e9:.1f} GFLOP/s; load average {load:.1f}")
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1, num_devices=1))
    with jax.set_mesh(mesh):
        conv = bench_conv(a)
        log("3x3 conv GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in conv.items()))
        im2col = bench_train(a, "im2col", mesh)
        ours = bench_train(a, "xla", mesh)
        sample_s = bench_sampling(a, ours.pop("model"))
    im2col.pop("model")
    images_per_s = a.batch / common.median(ours["seconds"])
    # Counted on the im2col program, where every convolution is a plain dot: XLA's transposed
    # convolutions of the backward pass would count the zeros a strided convolution inserts.
    flops = im2col["flops_per_image"]
    peer = {}
    if not a.no_peer:
        python = common.ensure_venv(a.peer_venv, PEER_PACKAGES, "import diffusers, torch", log)
        flags = {"image-size": a.image_size, "channels": a.channels, "layers": a.layers,
                 "context-dim": a.context_dim, "context-len": a.context_len, "heads": a.heads, "groups": a.groups,
                 "batch": a.batch, "train-iters": a.train_iters, "warmup": a.warmup, "peak-size": a.peak_size}
        peer = common.run_peer(python, PEER_SCRIPT, flags, a.peer_timeout, log)
    peer_rate, peer_flops = peer.get("diffusers_train_images_per_s"), peer.get("diffusers_train_flops_per_image")
    result = {
        "train_images_per_s": images_per_s,
        "train_mfu_cpu": images_per_s * flops / peak,
        "train_images_per_s_im2col": a.batch / common.median(im2col["seconds"]),
        "sample_images_per_s": a.batch * a.sample_steps / common.median(sample_s),
        "diffusers_train_images_per_s": peer_rate,
        "train_vs_diffusers": images_per_s / peer_rate if peer_rate else None,
        "diffusers_train_mfu_cpu": peer_rate * peer_flops / peak if peer_rate else None,
        "params": ours["params"],
        "diffusers_params": peer.get("diffusers_params"),
        "train_flops_per_image": flops,
        "diffusers_train_flops_per_image": peer_flops,
        "conv3x3_gflops": conv,
        "matmul_peak_gflops": peak / 1e9,
        "torch_matmul_peak_gflops": peer.get("torch_matmul_peak_gflops"),
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_start": load,
        "settings": {k: v for k, v in vars(a).items() if k not in ("json", "peer_venv", "peer_timeout",
                                                                    "channel_list")},
        "timings_s": {"train_step": ours["seconds"], "train_step_im2col": im2col["seconds"], "sample": sample_s,
                      "diffusers_train_step": peer.get("diffusers_train_step_seconds")},
        "peer_versions": {k: peer[k] for k in ("diffusers_version", "torch_version", "diffusers_adamw_fused",
                                               "torch_threads") if k in peer},
    }
    common.report(result, a.json, width=32)
    return result


if __name__ == "__main__":
    main()
