"""Optimizers from config: learning-rate schedules, clipping, weight decay and frozen parameters.

Every trainer builds its optax transformation here from the `optim` block of its config, so a
user switches schedule or freezes a tower by editing a config field, not trainer code:

    config.optim = optim.default_config()
    config.optim.lr = 3e-4
    config.optim.frozen = r"^image_encoder/"      # e.g. fine-tune the text side only
    tx = optim.make_optimizer(config.optim, total_steps=config.total_steps)

Parameter paths are the "/"-joined attribute names of the model (e.g. "decoder/layers/0/mlp/wi/kernel").
"""

from __future__ import annotations

import re
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx

SCHEDULES = ("cosine", "linear", "constant", "rsqrt")


def default_config() -> ml_collections.ConfigDict:
    """The `optim` block of a training config."""
    c = ml_collections.ConfigDict()
    c.name = "adamw"  # adamw | adafactor | sgd
    c.lr = 1e-3  # peak learning rate, reached at the end of warm-up
    c.schedule = "cosine"  # cosine | linear | constant | rsqrt: decay after warm-up
    c.warmup_steps = 100  # linear ramp from 0 to lr; protects freshly initialised layers
    c.end_lr_fraction = 0.0  # the final lr as a fraction of the peak (cosine / linear)
    c.b1 = 0.9  # Adam first-moment decay
    c.b2 = 0.98  # Adam second-moment decay; below 0.999 because text models spike otherwise
    c.eps = 1e-8  # Adam epsilon
    c.weight_decay = 0.05  # decoupled weight decay, applied to matrices only (see decay_mask)
    c.grad_clip_norm = 1.0  # global-norm clipping; 0 disables
    c.frozen = ""  # regex on parameter paths; matching params get no update at all
    return c


def lr_schedule(c: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Warm-up followed by the chosen decay, ending at `total_steps`."""
    if c.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={c.schedule!r}; valid: {', '.join(SCHEDULES)}")
    warmup = max(0, min(int(c.warmup_steps), total_steps))
    decay_steps = max(1, total_steps - warmup)
    end = c.lr * c.end_lr_fraction
    if c.schedule == "cosine":
        decay = optax.cosine_decay_schedule(c.lr, decay_steps, alpha=c.end_lr_fraction)
    elif c.schedule == "linear":
        decay = optax.linear_schedule(c.lr, end, decay_steps)
    elif c.schedule == "rsqrt":
        decay = lambda s: c.lr * jax.lax.rsqrt(1.0 + s / max(warmup, 1))  # noqa: E731
    else:
        decay = optax.constant_schedule(c.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, c.lr, warmup), decay], [warmup])


def _path(path: tuple) -> str:
    parts = []
    for p in path:
        key = getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))
        parts.append(str(key))
    return "/".join(parts)


def decay_mask(params: Any) -> Any:
    """True for weights that get weight decay: matrices and conv kernels, not biases, norm
    scales, embeddings' per-position vectors or learned temperatures (all 0-d / 1-d)."""
    return jax.tree.map(lambda x: getattr(x, "ndim", 0) >= 2, params)


def frozen_mask(params: Any, pattern: str) -> Any:
    """True for parameters whose path matches `pattern` (they are not updated)."""
    regex = re.compile(pattern)
    return jax.tree_util.tree_map_with_path(lambda p, _: bool(regex.search(_path(p))), params)


def make_optimizer(c: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """The optax transformation for the `optim` config block (see default_config)."""
    schedule = lr_schedule(c, total_steps)
    if c.name == "adamw":
        tx = optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=decay_mask)
    elif c.name == "adafactor":
        tx = optax.adafactor(schedule, weight_decay_rate=c.weight_decay or None, weight_decay_mask=decay_mask)
    elif c.name == "sgd":
        tx = optax.chain(optax.add_decayed_weights(c.weight_decay, mask=decay_mask), optax.sgd(schedule, momentum=c.b1))
    else:
        raise ValueError(f"optim.name={c.name!r}; valid: adamw, adafactor, sgd")
    if c.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), tx)
    if c.frozen:
        pattern = c.frozen
        # Frozen params get zero updates and, through multi_transform, no optimizer moments.
        tx = optax.multi_transform(
            {"train": tx, "frozen": optax.set_to_zero()},
            lambda params: jax.tree.map(lambda f: "frozen" if f else "train", frozen_mask(params, pattern)),
        )
    return tx


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (nnx.Param leaves)."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
