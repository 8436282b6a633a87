"""Timing helpers shared by the JAX benchmarks: the machine's matmul peak and per-call timings.

Model FLOP utilisation on a CPU needs a peak to divide by, and a CPU has no datasheet peak that
XLA actually reaches (turbo, AVX width, other load on the machine all move it). So the peak is
measured in the same process, right before the benchmark, with the operation every model here
is made of: a large float32 matmul. Whatever slows the machine down (another job, thermal
limits) slows the peak and the model alike, which keeps the ratio meaningful on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


def peer_bench_parser(doc: str, peer: str, default_venv: str) -> argparse.ArgumentParser:
    """The options every benchmark against a PyTorch peer shares (--json, --quick, --no-peer,
    --peer-venv, --peer-timeout); the benchmark adds its dimensions and iteration counts."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quick", action="store_true", help="few timed iterations (same dimensions)")
    p.add_argument("--no-peer", action="store_true", help=f"skip {peer}")
    p.add_argument("--peer-venv", default=default_venv, help=f"the venv for {peer} (created if missing)")
    p.add_argument("--peer-timeout", type=float, default=1800.0, help="seconds before the peer is abandoned")
    return p


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


# ----------------------------------------------------------------------------------------------
# FLOPs of a traced program, and peers in virtual environments of their own


def _sub_jaxprs(eqn) -> list[tuple[object, int]]:
    """(inner jaxpr, times it runs) for the call-like parameters of one equation."""
    out = []
    for name, value in eqn.params.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            inner = getattr(v, "jaxpr", v)
            if hasattr(inner, "eqns"):
                # A scan body runs `length` times; a cond branch or a call once (an upper bound
                # for conds, which take one branch: every branch is counted).
                out.append((inner, int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1))
    return out


def matmul_flops(fn: Callable, *args) -> float:
    """FLOPs of the matmuls and convolutions `fn(*args)` performs (2 per multiply-add).

    Counted from the traced program (jax.make_jaxpr), so it is exact for whatever the model
    does, forward and backward alike, and leaves out elementwise work, as model FLOP
    utilisation usually does.
    """
    import numpy as np

    def count(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                (lhs_contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                k = float(np.prod([lhs[d] for d in lhs_contract])) if lhs_contract else 1.0
                total += 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * k
            elif name == "conv_general_dilated":
                rhs = eqn.invars[1].aval.shape
                spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...) positions
                per_output = float(np.prod([rhs[d] for d in spec[1:]]))  # Cin/groups x kernel window
                total += 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * per_output
            for inner, times in _sub_jaxprs(eqn):
                total += times * count(inner)
        return total

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def ensure_venv(venv: str, packages: tuple[str, ...], probe: str, log: Callable[[str], None]) -> str:
    """The python of `venv`, created and given `packages` first if `probe` (an import line)
    fails there. pip's output goes to stderr, so a benchmark's stdout stays its JSON."""
    import os
    import subprocess
    import sys

    python = os.path.join(venv, "bin", "python")
    check = [python, "-c", probe]
    if os.path.exists(python) and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    if not os.path.exists(python):
        log(f"creating the venv {venv} (first use; several minutes)")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    log(f"installing {' '.join(packages)} into {venv}")
    subprocess.run([python, "-m", "pip", "install", *packages], check=True, stdout=sys.stderr)
    subprocess.run(check, check=True)
    return python


def run_peer(python: str, script: str, flags: dict, timeout: float, log: Callable[[str], None]) -> dict:
    """Runs a peer script with `--key value` flags; returns the JSON object of its last stdout line."""
    import subprocess

    cmd = [python, script] + [x for k, v in flags.items() for x in (f"--{k}", str(v))]
    log("running the peer: " + " ".join(cmd))
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, check=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return json.loads(lines[-1])
