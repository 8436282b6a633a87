"""Exponential moving average of a model's parameters, with a warm-up of the decay.

    ema_params <- d * ema_params + (1 - d) * params,   d = min(decay, (1 + n) / (10 + n))

after the n-th optimizer step. The warm-up (the schedule of Tensorflow's ExponentialMovingAverage
with num_updates) makes the average follow the fast early progress instead of being anchored to
the random initialisation for ~1 / (1 - decay) steps: with decay 0.999 a plain EMA would still be
37% initial weights after 1,000 steps, i.e. most of a 20-minute CPU run.

`EMA` is a task's extra state in the shared training loop (`TrainState.extra`): it is created
from the fresh model inside the sharded initialiser (so the copy is sharded like the model),
updated inside the jitted step by `after_update`, checkpointed and resumed with everything else.
Samplers and evals read `ema.model`, a module of the same class as the trained one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def decay_at(step, decay: float, warmup: bool = True):
    """The decay used after optimizer step `step` (1 after the first update)."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


class EMA(nnx.Module):
    """Holds `model`, a copy of the trained model whose parameters are the moving average."""

    def __init__(self, model: nnx.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.model = nnx.clone(model)
        self.decay, self.warmup = float(decay), bool(warmup)

    def update(self, model: nnx.Module, step) -> None:
        """Moves the average toward `model`'s current parameters (jax ops only: runs under jit)."""
        d = decay_at(step, self.decay, self.warmup)
        ema = nnx.state(self.model, nnx.Param)
        new = jax.tree.map(lambda e, p: (e + (1.0 - d) * (p.astype(e.dtype) - e)).astype(e.dtype),
                           ema, nnx.state(model, nnx.Param))
        nnx.update(self.model, new)
