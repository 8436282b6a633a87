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
import jax.numpy as jnp
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


def _keys(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)


def _path(path: tuple) -> str:
    return "/".join(_keys(path))


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
        tx = skip_frozen(tx, c.frozen)
    return tx


def skip_frozen(tx: optax.GradientTransformation, pattern: str) -> optax.GradientTransformation:
    """`tx` applied to the params whose path does not match `pattern`; matching params get zero
    updates and no optimizer state at all.

    The inner state is built over a nested dict of the trainable params only. (optax's masking
    would instead leave a placeholder leaf per frozen param inside the optimizer state, which
    nnx wraps like an array of the param's shape and sharded creation then cannot place.)"""
    regex = re.compile(pattern)
    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731  (init sees Variables, update arrays)

    def split(tree):
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)
        keys = [_keys(p) for p, _ in flat]
        frozen = [bool(regex.search("/".join(k))) for k in keys]
        trainable: dict = {}
        for k, (_, leaf), f in zip(keys, flat, frozen):
            if not f:
                node = trainable
                for part in k[:-1]:
                    node = node.setdefault(part, {})
                node[k[-1]] = leaf
        return trainable, (flat, keys, frozen, treedef)

    def init(params):
        return tx.init(split(params)[0])

    def update(updates, state, params=None):
        trainable, (flat, keys, frozen, treedef) = split(updates)
        inner, state = tx.update(trainable, state, None if params is None else split(params)[0])
        leaves = []
        for k, (_, leaf), f in zip(keys, flat, frozen):
            if f:
                leaves.append(jax.tree.map(jnp.zeros_like, leaf))
            else:
                node = inner
                for part in k:
                    node = node[part]
                leaves.append(node)
        return treedef.unflatten(leaves), state

    return optax.GradientTransformation(init, update)


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (nnx.Param leaves)."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
