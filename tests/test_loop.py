"""The shared training loop: exact resume after a crash, the NaN guard, config saving."""

import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dalle3_jax import metrics, sharding
from dalle3_jax.trainers import loop


class _Regression(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.wi = nnx.Linear(8, 32, kernel_init=sharding.logical(init, ("embed", "mlp")), rngs=rngs)
        self.wo = nnx.Linear(32, 1, kernel_init=sharding.logical(init, ("mlp", "embed")), rngs=rngs)

    def __call__(self, x):
        return self.wo(jax.nn.gelu(self.wi(x)))[:, 0]


class _Rows:
    """A random-access source of (x, y) rows; row `nan_at` holds a NaN when set."""

    def __init__(self, n=256, nan_at=None):
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(n, 8)).astype(np.float32)
        self.y = (self.x @ rng.normal(size=8)).astype(np.float32)
        if nan_at is not None:
            self.x[nan_at, 0] = np.nan

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class _Crash(RuntimeError):
    pass


def _task(source, crash_at_eval=None):
    def train_data():
        return grain.MapDataset.source(source).shuffle(seed=3).repeat().batch(16).to_iter_dataset()

    def loss_fn(model, batch, rng):
        err = model(batch["x"]) - batch["y"]
        return jnp.mean(err**2), {"mae": jnp.mean(jnp.abs(err))}

    def evaluate(model, step):
        if crash_at_eval is not None and step == crash_at_eval:
            raise _Crash(f"crash at step {step}")
        return {"scalars": {"w_norm": float(jnp.linalg.norm(model.wi.kernel[...]))}}

    return loop.Task(make_model=lambda: _Regression(nnx.Rngs(0)), loss_fn=loss_fn, train_data=train_data,
                     evaluate=evaluate, batch_keys=("x", "y"), examples_per_step=16)


def _config(**overrides):
    c = loop.loop_config()
    c.trainer = "regression"
    c.total_steps = 8
    c.log_every = 1
    c.eval_every = 4
    c.checkpoint_every = 4
    c.mesh.data = 2
    c.mesh.fsdp = 4
    c.optim.warmup_steps = 2
    c.optim.lr = 0.03
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def _losses(workdir):
    return {r["step"]: r["values"]["train/loss"] for r in metrics.read_jsonl(workdir) if "train/loss" in r["values"]}


def test_crash_then_rerun_matches_uninterrupted(tmp_path):
    straight = str(tmp_path / "straight")
    out = loop.train_and_evaluate(_config(), straight, _task(_Rows()))
    assert out["step"] == 8 and "w_norm" in out
    base = _losses(straight)
    assert sorted(base) == list(range(1, 9))
    assert base[8] < base[1]  # it learns

    crashed = str(tmp_path / "crashed")
    with pytest.raises(_Crash):
        loop.train_and_evaluate(_config(), crashed, _task(_Rows(), crash_at_eval=4))
    assert sorted(_losses(crashed)) == [1, 2, 3, 4]
    loop.train_and_evaluate(_config(), crashed, _task(_Rows()))
    resumed = _losses(crashed)
    # Steps after the resume see the same params, optimizer state and batches: bitwise equal.
    for s in range(5, 9):
        assert resumed[s] == base[s], (s, resumed[s], base[s])

    with open(os.path.join(crashed, "config.json")) as f:
        assert json.load(f)["total_steps"] == 8
    # A finished run does nothing on rerun.
    again = loop.train_and_evaluate(_config(), crashed, _task(_Rows()))
    assert again["step"] == 8


def test_nan_stops_run_and_keeps_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "nan")
    # Poison the row that the loader's shuffle puts first in step 7's batch.
    order = list(grain.MapDataset.range(256).shuffle(seed=3))
    source = _Rows(nan_at=order[6 * 16])
    with pytest.raises(metrics.NonFiniteError, match=r"Non-finite metric\(s\) at step 7: .*loss=nan"):
        loop.train_and_evaluate(_config(total_steps=16, eval_every=0), workdir, _task(source))
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps == [4]  # the checkpoint due at step 8 was never written
    losses = _losses(workdir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(np.isfinite(v) for v in losses.values())
    # The last good checkpoint is intact: with the bad row fixed, the same run resumes from it.
    out = loop.train_and_evaluate(_config(total_steps=16, eval_every=0), workdir, _task(_Rows()))
    assert out["step"] == 16
    resumed = [r["step"] for r in metrics.read_jsonl(workdir) if "train/loss" in r["values"]][6:]
    assert resumed == list(range(5, 17))
