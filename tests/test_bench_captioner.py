"""Smoke test of benchmarks/bench_captioner.py: the JAX half at a tiny size, and its FLOP counts.

The open_clip peer needs its own venv (torch, several GB) and minutes of CPU, so it is skipped
here (--no-peer); only the argument handling of the peer script, which imports no torch at module
level, is checked.
"""

import importlib.util
import json
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--image-size", "16", "--patch", "8", "--width", "32", "--vit-layers", "1", "--vit-heads", "2",
        "--text-heads", "2", "--unimodal-layers", "1", "--multimodal-layers", "1", "--vocab", "64",
        "--context", "8", "--pool-queries", "4", "--pool-heads", "2", "--batch", "4", "--new-tokens", "6",
        "--warmup", "1", "--train-iters", "1", "--decode-iters", "1", "--slow-decode-iters", "1",
        "--peak-size", "128"]


def _load(name, *parts):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, *parts))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_jax_half_prints_one_json_object_of_numbers(capsys):
    bench = _load("bench_captioner", "benchmarks", "bench_captioner.py")
    bench.main(["--json", "--no-peer"] + TINY)
    out = json.loads(capsys.readouterr().out)  # stdout is exactly one JSON object
    for key in ("train_images_per_s", "train_mfu_cpu", "decode_captions_per_s", "decode_uncached_captions_per_s",
                "decode_kv_vs_uncached", "matmul_peak_gflops", "train_flops_per_image",
                "open_clip_train_flops_per_image", "params", "cpu_count"):
        assert isinstance(out[key], (int, float)) and math.isfinite(out[key]) and out[key] > 0, (key, out[key])
    assert 0 < out["train_mfu_cpu"] < 1.5  # a fraction of the measured peak (timing noise aside)
    assert out["decode_kv_matches_uncached"] > 0.9  # both decoders pick the same greedy tokens
    for key in ("open_clip_train_images_per_s", "open_clip_generate_captions_per_s", "decode_vs_open_clip",
                "train_vs_open_clip"):
        assert out[key] is None, key  # skipped peer: null, not a made-up number
    assert out["settings"]["batch"] == 4 and len(out["timings_s"]["train_step"]) == 1
    # The analytic count tracks XLA's count of the compiled step, which also counts elementwise
    # work and the optimizer (a large share at this tiny width; within 1% at the default dims).
    assert 0.9 < out["train_step_xla_flops_per_image"] / out["train_flops_per_image"] < 2.0


def test_peer_arguments_build_a_matched_open_clip_config():
    peer = _load("open_clip_coca", "benchmarks", "peers", "open_clip_coca.py")
    cfg = peer.model_config(peer.parse_args(["--width", "256", "--vit-heads", "4", "--vocab", "1000"]))
    assert cfg["embed_dim"] == cfg["multimodal_cfg"]["width"] == 256
    assert cfg["vision_cfg"]["head_width"] == 64 and cfg["vision_cfg"]["attentional_pool"]
    assert cfg["text_cfg"]["vocab_size"] == cfg["multimodal_cfg"]["vocab_size"] == 1000
