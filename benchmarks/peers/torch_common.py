"""Timing helpers shared by the PyTorch peers of the benchmarks (stdlib at import; torch lazily).

The peers run in virtual environments of their own (their pins clash with this project's), so
they cannot import benchmarks/common.py, which needs JAX; this is its PyTorch counterpart.
"""

from __future__ import annotations

import sys
import time


def log(tag: str, msg: str) -> None:
    """Progress on stderr: stdout carries only the peer's one JSON line."""
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


def seconds_per_call(fn, iters: int, warmup: int) -> list[float]:
    """Seconds of each of `iters` calls of `fn` after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()  # torch eager on the CPU is synchronous: the work is done when the call returns
        out.append(time.perf_counter() - start)
    return out


def matmul_peak_flops(n: int = 2048) -> float:
    """Best of 5 float32 n x n x n torch.mm calls, in FLOP/s: the peak as torch's BLAS sees it."""
    import torch

    x = torch.randn(n, n)
    return 2.0 * n**3 / min(seconds_per_call(lambda: torch.mm(x, x), iters=5, warmup=1))
