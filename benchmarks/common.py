"""Timing helpers shared by the JAX benchmarks: the machine's matmul peak and per-call timings.

Model FLOP utilisation on a CPU needs a peak to divide by, and a CPU has no datasheet peak that
XLA actually reaches (turbo, AVX width, other load on the machine all move it). So the peak is
measured in the same process, right before the benchmark, with the operation every model here
is made of: a large float32 matmul. Whatever slows the machine down (another job, thermal
limits) slows the peak and the model alike, which keeps the ratio meaningful on a busy machine.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


def matmul_peak_flops(n: int = 2048, reps: int = 5) -> float:
    """Best observed FLOP/s of an n x n x n float32 `jnp.dot` (2 n^3 FLOPs per call).

    The best of `reps` timed calls (after one compile-and-warm-up call): the peak is what the
    hardware can do, so the least-disturbed call is the right estimate of it.
    """
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n, n), jnp.float32)
    y = jax.random.normal(ky, (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    seconds = time_calls(lambda: dot(x, y), iters=reps, warmup=1)
    return 2.0 * n**3 / min(seconds)


def time_calls(fn: Callable[[], object], iters: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `iters` calls of `fn`, after `warmup` untimed calls.

    Each call's result is blocked on before the clock stops, so asynchronous dispatch never hides
    work in the next call; the warm-up calls absorb compilation and first-touch allocation.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn())
    seconds = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        seconds.append(time.perf_counter() - start)
    return seconds


def median(seconds: list[float]) -> float:
    """The median call time: robust to the odd call that another process on the machine slowed."""
    return statistics.median(seconds)


def report(result: dict, as_json: bool, width: int = 28) -> None:
    """Prints a benchmark's result: one JSON object (the machine-readable report) or a table."""
    if as_json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        if isinstance(value, float) and math.isfinite(value):
            value = f"{value:.4g}"
        print(f"{key:{width}s} {value}")
