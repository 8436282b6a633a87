"""Captioner speed: our CoCa vs open_clip's CoCa at matched dimensions, measured in one run.

    python benchmarks/bench_captioner.py --json            # one JSON object (the benchmark report)
    python benchmarks/bench_captioner.py --quick           # fewer timed iterations, a table
    python benchmarks/bench_captioner.py --json --no-peer  # our side only

Default dimensions (the issue's ~13.7M-parameter open_clip CoCa): 64 px images, patch 8, width
256 everywhere (embed_dim too), 4 ViT + 4 unimodal + 4 multimodal layers, 4 heads (attentional
poolers: 8 heads, 256 queries = 1 contrastive + 255 caption queries on both sides), vocabulary
exactly 1000 on both sides, text length 32, batch 64, float32.
Ours uses an untied output head, as open_clip does. The towers differ where the two
designs differ: open_clip's ViT has a class token, and each of its multimodal layers has a second
MLP after its cross-attention; the parameter counts and analytic FLOPs below reflect that.

Measured (median seconds per call after warm-up; compile time excluded):
  train_images_per_s          batch / one AdamW step (forward, CoCa loss with contrastive
                              weight 1 and caption weight 2, backward, clipping, update), built
                              with the project's loop.compile_train_step on a 1-device mesh
                              (XLA CPU still uses every core inside that device)
  decode_captions_per_s       decode.generate, greedy, `--new-tokens` tokens, KV cache
  decode_uncached_...         decode.generate_uncached: full forward over the prefix per token
  open_clip_*                 benchmarks/peers/open_clip_coca.py in its own venv (see there)
Both decoders get min_len = new tokens (eos banned), so every caption runs the full length.

FLOPs are counted analytically from the dimensions (`forward_flops`): 2 FLOPs per multiply-add
of every matmul (patch embedding, attention projections, attention scores and weighted values
over the full, masked square, MLPs, poolers, output head, embedding projections, the B x B
similarity); a train step counts 3x the forward. The MFU is model FLOP/s / the float32 matmul
peak measured in this run with jnp.dot (benchmarks/common.py). XLA's own count of our compiled
train step (cost_analysis, which also counts elementwise ops and the optimizer) is reported
beside it as a cross-check (within 1% at the default dimensions).

Run time on 2 cores: most of it is open_clip's generate (3 calls of 32 full-prefix passes); the
default run took under 7 minutes and --quick about 4 on a machine busy with another job.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PEER_SCRIPT = os.path.join(ROOT, "benchmarks", "peers", "open_clip_coca.py")
DEFAULT_PEER_VENV = os.path.join(ROOT, ".bench_venvs", "open_clip")
# torch/torchvision at the versions this machine has on disk; transformers below 4.57 because
# open_clip's generate imports BeamSearchScorer from its top level.
PEER_PACKAGES = ("torch==2.14.1", "torchvision==0.29.1", "open_clip_torch", "timm", "transformers==4.55.4")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def log(msg: str) -> None:
    print(f"[bench_captioner] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    from benchmarks import common

    p = common.peer_bench_parser(__doc__, "open_clip", DEFAULT_PEER_VENV)
    dims = p.add_argument_group("dimensions (both models)")
    for name, default in [("image-size", 64), ("patch", 8), ("width", 256), ("vit-layers", 4), ("vit-heads", 4),
                          ("text-heads", 4), ("unimodal-layers", 4), ("multimodal-layers", 4), ("vocab", 1000),
                          ("context", 32), ("pool-queries", 256), ("pool-heads", 8), ("batch", 64),
                          ("new-tokens", 32)]:
        dims.add_argument(f"--{name}", type=int, default=default)
    it = p.add_argument_group("iterations")
    it.add_argument("--warmup", type=int, default=2, help="untimed train steps (the first also compiles)")
    it.add_argument("--train-iters", type=int, default=8, help="timed train steps, each side")
    it.add_argument("--decode-iters", type=int, default=5, help="timed KV-cached generate calls")
    it.add_argument("--slow-decode-iters", type=int, default=2,
                    help="timed calls of the uncached reference and of open_clip's generate")
    it.add_argument("--peak-size", type=int, default=2048, help="side of the matmul peak probe")
    a = p.parse_args(argv)
    if a.quick:
        a.warmup, a.train_iters, a.decode_iters, a.slow_decode_iters = 1, 2, 2, 1
    if a.new_tokens > a.context:
        p.error(f"--new-tokens {a.new_tokens} exceeds --context {a.context} (the position table)")
    return a


# ------------------------------------------------------------------------------------------------
# Analytic FLOPs (2 per multiply-add), per image, forward pass
# ------------------------------------------------------------------------------------------------


def _attention(q_len: int, kv_len: int, d_model: int, d_kv: int) -> float:
    """Q and output projections on q_len rows, K and V projections from d_kv on kv_len rows,
    scores and weighted values over all q_len x kv_len pairs (inner width d_model)."""
    return 2 * q_len * d_model * d_model * 2 + 2 * kv_len * d_kv * d_model * 2 + 4 * q_len * kv_len * d_model


def _mlp(n: int, d: int, ratio: int = 4) -> float:
    return 2 * n * d * (ratio * d) * 2


def forward_flops(a: argparse.Namespace, peer: bool) -> float:
    """Forward FLOPs per image of our CoCa (peer=False) or open_clip's (peer=True) at a's dims."""
    d, e, length, vocab = a.width, a.width, a.context, a.vocab
    n = (a.image_size // a.patch) ** 2
    patch_embed = 2 * n * a.patch * a.patch * 3 * d
    similarity = 2 * a.batch * e  # this image's row of the B x B contrastive logits
    if not peer:
        q = a.pool_queries - 1  # caption queries; the contrastive pooler has its own single query
        vit = patch_embed + a.vit_layers * (_attention(n, n, d, d) + _mlp(n, d))
        pools = _attention(1, n, d, d) + _attention(q, n, d, d)
        uni = a.unimodal_layers * (_attention(length + 1, length + 1, d, d) + _mlp(length + 1, d))  # + CLS
        multi = a.multimodal_layers * (_attention(length, length, d, d) + _attention(length, q, d, d)
                                       + _mlp(length, d))
        head = 2 * length * d * vocab
        proj = 2 * d * e * 2  # image and text embedding projections
        return vit + pools + uni + multi + head + proj + similarity
    # open_clip: a class token in the ViT, one pooler (query 0 contrastive, the rest caption
    # tokens), the decoder reads tokens[:-1], and each multimodal layer is a self-attention block
    # (with MLP) followed by a cross-attention block (with MLP).
    q, dec = a.pool_queries, length - 1
    vit = patch_embed + a.vit_layers * (_attention(n + 1, n + 1, d, d) + _mlp(n + 1, d))
    pools = _attention(q, n + 1, e, d)
    uni = a.unimodal_layers * (_attention(length + 1, length + 1, d, d) + _mlp(length + 1, d))
    multi = a.multimodal_layers * (_attention(dec, dec, d, d) + _mlp(dec, d) + _attention(dec, q - 1, d, e)
                                   + _mlp(dec, d))
    head = 2 * dec * d * vocab
    proj = 2 * e * e + 2 * d * e  # pooled image projection, text projection
    return vit + pools + uni + multi + head + proj + similarity


# ------------------------------------------------------------------------------------------------
# Our side
# ------------------------------------------------------------------------------------------------


def our_config(a: argparse.Namespace):
    from dalle3_jax.models import coca

    return coca.config(
        "tiny", image_size=a.image_size, patch_size=a.patch, vit_width=a.width, vit_depth=a.vit_layers,
        vit_heads=a.vit_heads, text_width=a.width, text_heads=a.text_heads, unimodal_layers=a.unimodal_layers,
        multimodal_layers=a.multimodal_layers, n_caption_queries=a.pool_queries - 1, pool_heads=a.pool_heads,
        embed_dim=a.width, vocab_size=a.vocab, max_text_len=a.context, tied_embedding=False,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID,
    )


def host_batch(a: argparse.Namespace, seed: int = 0) -> dict:
    """Random images in [-1, 1] and full-length captions: bos, random words, eos (no padding)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (a.batch, a.image_size, a.image_size, 3)).astype(np.float32)
    tokens = rng.integers(3, a.vocab, (a.batch, a.context)).astype(np.int32)
    tokens[:, 0], tokens[:, -1] = BOS_ID, EOS_ID
    return {"image": images, "tokens": tokens}


def _xla_flops(compiled) -> float:
    """XLA's FLOP count of a compiled program (a dict, or a one-dict list on older jax)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return float("nan")
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def bench_ours(a: argparse.Namespace) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from benchmarks import common
    from dalle3_jax import optim, sharding
    from dalle3_jax.models import coca
    from dalle3_jax.recaption import decode
    from dalle3_jax.trainers import loop

    peak = common.matmul_peak_flops(a.peak_size)
    log(f"matmul peak (jnp.dot {a.peak_size}^3, float32): {peak / 1e9:.1f} GFLOP/s")
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1, num_devices=1))
    cfg = our_config(a)
    tx = optim.make_optimizer(optim.default_config(), a.warmup + a.train_iters)
    task = loop.Task(make_model=lambda: coca.create(cfg),
                     loss_fn=lambda model, batch, rng: coca.loss_fn(model, batch, w_con=1.0, w_cap=2.0),
                     train_data=lambda: None, batch_keys=("image", "tokens"))
    with jax.set_mesh(mesh):
        ts = sharding.create_sharded(lambda: loop.TrainState(task.make_model(), tx), mesh)
        n_params = optim.count_params(ts.model)
        batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in host_batch(a).items()}
        rng = jax.random.key(0)
        start = time.perf_counter()
        _, step, _ = loop.compile_train_step(task, ts, batch, rng)
        log(f"ours: {n_params:,} parameters; train step compiled in {time.perf_counter() - start:.1f}s")
        xla_flops = _xla_flops(step)
        state = nnx.state(ts)

        def train_step():
            nonlocal state
            state, metrics = step(state, batch, rng)  # the state is donated: keep only the new one
            return state, metrics

        log(f"ours: train, {a.warmup} warm-up + {a.train_iters} timed steps at batch {a.batch}")
        train_s = common.time_calls(train_step, a.train_iters, a.warmup)
        nnx.update(ts, state)
        model = ts.model

        images = jax.device_put(host_batch(a, seed=1)["image"], sharding.batch_sharding(mesh, 4))
        t = a.new_tokens
        cached = lambda: decode.generate(model, images, max_len=t, method="greedy", min_len=t)  # noqa: E731
        uncached = lambda: decode.generate_uncached(model, images, max_len=t, min_len=t)  # noqa: E731
        log(f"ours: KV-cached greedy decoding, 1 warm-up + {a.decode_iters} timed calls")
        tokens_cached = np.asarray(cached())
        cached_s = common.time_calls(cached, a.decode_iters, warmup=0)
        log(f"ours: uncached reference, 1 warm-up + {a.slow_decode_iters} timed calls")
        tokens_uncached = np.asarray(uncached())
        uncached_s = common.time_calls(uncached, a.slow_decode_iters, warmup=0)

    train_per_image = 3 * forward_flops(a, peer=False)
    images_per_s = a.batch / common.median(train_s)
    return {
        "train_images_per_s": images_per_s,
        "train_mfu_cpu": images_per_s * train_per_image / peak,
        "decode_captions_per_s": a.batch / common.median(cached_s),
        "decode_uncached_captions_per_s": a.batch / common.median(uncached_s),
        # Same greedy tokens from both decoders (up to float ties): the cache is computing the same thing.
        "decode_kv_matches_uncached": float(np.mean(tokens_cached == tokens_uncached)),
        "params": n_params,
        "matmul_peak_gflops": peak / 1e9,
        "train_flops_per_image": train_per_image,
        "train_step_xla_flops_per_image": xla_flops / a.batch,
        "timings_s": {"train_step": train_s, "decode": cached_s, "decode_uncached": uncached_s},
    }


# ------------------------------------------------------------------------------------------------
# The peer
# ------------------------------------------------------------------------------------------------


def run_peer(a: argparse.Namespace) -> dict:
    from benchmarks import common

    python = common.ensure_venv(a.peer_venv, PEER_PACKAGES, "import open_clip, torch, transformers", log)
    flags = {"image-size": a.image_size, "patch": a.patch, "width": a.width, "vit-layers": a.vit_layers,
             "vit-heads": a.vit_heads, "text-heads": a.text_heads, "unimodal-layers": a.unimodal_layers,
             "multimodal-layers": a.multimodal_layers, "vocab": a.vocab, "context": a.context,
             "pool-queries": a.pool_queries, "pool-heads": a.pool_heads, "batch": a.batch,
             "train-iters": a.train_iters, "warmup": a.warmup, "decode-iters": a.slow_decode_iters,
             "new-tokens": a.new_tokens, "peak-size": a.peak_size}
    return common.run_peer(python, PEER_SCRIPT, flags, a.peer_timeout, log)


# ------------------------------------------------------------------------------------------------


def _ratio(x, y):
    return x / y if x is not None and y else None


def main(argv=None) -> dict:
    a = parse_args(argv)
    load = os.getloadavg()[0]
    result = bench_ours(a)
    peer = run_peer(a) if not a.no_peer else {}
    oc_train, oc_gen = peer.get("open_clip_train_images_per_s"), peer.get("open_clip_generate_captions_per_s")
    peak_flops = result["matmul_peak_gflops"] * 1e9
    oc_flops = 3 * forward_flops(a, peer=True)
    timings = result.pop("timings_s")
    if peer:
        timings.update(open_clip_train_step=peer["open_clip_train_step_seconds"],
                       open_clip_generate=peer["open_clip_generate_seconds"])
    result.update({
        "open_clip_train_images_per_s": oc_train,
        "open_clip_generate_captions_per_s": oc_gen,
        "open_clip_train_mfu_cpu": oc_train * oc_flops / peak_flops if oc_train else None,
        "decode_kv_vs_uncached": _ratio(result["decode_captions_per_s"], result["decode_uncached_captions_per_s"]),
        "decode_vs_open_clip": _ratio(result["decode_captions_per_s"], oc_gen),
        "train_vs_open_clip": _ratio(result["train_images_per_s"], oc_train),
        "open_clip_params": peer.get("open_clip_params"),
        "open_clip_train_flops_per_image": oc_flops,
        "torch_matmul_peak_gflops": peer.get("torch_matmul_peak_gflops"),
        "open_clip_generate_rows_stopped_early": peer.get("open_clip_generate_rows_stopped_early"),
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_start": load,
        "flops_counted": "analytic: 2 per multiply-add of every matmul incl. full masked attention; train = 3x forward",
        "settings": {k: v for k, v in vars(a).items() if k not in ("json", "peer_venv", "peer_timeout")},
        "timings_s": timings,
        "peer_versions": {k: peer[k] for k in ("open_clip_version", "torch_version", "open_clip_adamw_fused",
                                               "torch_threads") if k in peer},
    })
    if a.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if isinstance(value, float) and math.isfinite(value):
                value = f"{value:.4g}"
            if not isinstance(value, (dict, list)):
                print(f"{key:42s} {value}")
    return result


if __name__ == "__main__":
    main()
