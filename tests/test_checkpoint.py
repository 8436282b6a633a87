"""Exact resume: sharded model + optimizer + Grain data position; resume order; bookkeeping."""

import os

import grain
import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from dalle3_jax import checkpoint, sharding

MESH = {"data": 2, "fsdp": 4, "tensor": 1}


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, d: int = 4, hidden: int = 16, extra: bool = False):
        init = nnx.initializers.lecun_normal()
        self.wi = nnx.Linear(d, hidden, kernel_init=sharding.logical(init, ("embed", "mlp")), rngs=rngs)
        self.wo = nnx.Linear(hidden, d, kernel_init=sharding.logical(init, ("mlp", "embed")), rngs=rngs)
        if extra:  # a fine-tune head the pretrained checkpoint does not have
            self.head = nnx.Linear(d, 2, kernel_init=sharding.logical(init, ("embed", None)), rngs=rngs)

    def __call__(self, x):
        return self.wo(jax.nn.relu(self.wi(x)))


def make_ctor(seed=0, **kw):
    def ctor():
        model = Net(nnx.Rngs(seed), **kw)
        return {"model": model, "opt": nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)}

    return ctor


@nnx.jit(donate_argnums=0)
def train_step(train_state, batch):
    model, opt = train_state["model"], train_state["opt"]

    def loss_fn(model):
        return ((model(batch) - batch[:, ::-1]) ** 2).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss


def _scale(batch):
    # Module-level so Grain can ship it to worker processes.
    return batch * 0.01


def make_dataset(num_workers=0):
    source = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)
    ds = grain.MapDataset.source(source).shuffle(seed=7).map(_scale).batch(8, drop_remainder=True).repeat()
    ds = ds.to_iter_dataset()
    if num_workers:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return ds


def host_copy(state):
    return [np.array(x) for x in jax.tree.leaves(state)]


def test_exact_resume_sharded_state_and_data(tmp_path):
    mesh = sharding.make_mesh(MESH)
    ctor = make_ctor()
    train_state = sharding.create_sharded(ctor, mesh)
    it = iter(make_dataset())
    config = ml_collections.ConfigDict({"lr": 1e-2, "mesh": dict(MESH), "name": "resume"})
    with jax.set_mesh(mesh):
        for _ in range(3):
            train_step(train_state, sharding.global_batch({"x": next(it)}, mesh)["x"])
        ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", async_save=True)
        assert ckpt.save(3, nnx.state(train_state), data_iter=it, config=config)
        saved = host_copy(nnx.state(train_state))
        # Keep training while the save is in flight: the donated buffers must not leak into it.
        b_next = next(it)
        train_step(train_state, sharding.global_batch({"x": b_next}, mesh)["x"])
        ckpt.close()

    fresh = checkpoint.Checkpointer(tmp_path / "ckpt")
    assert fresh.latest_step() == 3
    _, abstract = sharding.abstract_state(ctor, mesh)
    it2 = iter(make_dataset())
    restored = fresh.restore(abstract_state=abstract, data_iter=it2)
    np.testing.assert_array_equal(next(it2), b_next)
    for got, want, target in zip(jax.tree.leaves(restored), saved, jax.tree.leaves(abstract)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), want)  # bitwise (also int step counters)
        assert got.sharding == target.sharding
    model = nnx.merge(*nnx.split(sharding.create_sharded(ctor, mesh))[:1], restored)["model"]
    assert model.wi.kernel.get_value().sharding.spec == jax.P("fsdp", None)
    assert fresh.restore_config() == config.to_dict()
    # Resuming on another mesh shape: Orbax reshards into the new abstract state's layout.
    other = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, abstract = sharding.abstract_state(ctor, other)
    resharded = fresh.restore(abstract_state=abstract)
    for got, want, target in zip(jax.tree.leaves(resharded), saved, jax.tree.leaves(abstract)):
        np.testing.assert_array_equal(np.asarray(got), want)
        assert got.sharding == target.sharding
    assert resharded["model"]["wi"]["kernel"].get_value().sharding.spec == jax.P("fsdp", "tensor")
    fresh.close()


def test_exact_resume_multiprocess_iterator(tmp_path):
    ds = make_dataset(num_workers=2)
    it = iter(ds)
    for _ in range(3):
        next(it)
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(3, {"step": np.int32(3)}, data_iter=it)
        b_next = np.array(next(it))
    it.close()
    it2 = iter(ds)
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        state = ckpt.restore(abstract_state={"step": jax.ShapeDtypeStruct((), np.int32)}, data_iter=it2)
    assert int(state["step"]) == 3
    np.testing.assert_array_equal(np.array(next(it2)), b_next)
    it2.close()


def _params(state):
    return host_copy(nnx.state(nnx.merge(*nnx.split(nnx.eval_shape(make_ctor()))[:1], state)["model"], nnx.Param))


def test_resume_order(tmp_path):
    mesh = sharding.make_mesh(MESH)
    ctor = make_ctor(seed=1)
    _, abstract = sharding.abstract_state(ctor, mesh)
    init_fn = lambda: nnx.state(sharding.create_sharded(ctor, mesh))  # noqa: E731

    # A "pretraining" run with two checkpoints whose params differ from a fresh init.
    pre = sharding.create_sharded(make_ctor(seed=0), mesh)
    with jax.set_mesh(mesh), checkpoint.Checkpointer(tmp_path / "pre") as ckpt:
        train_step(pre, jax.numpy.ones((8, 4)))
        ckpt.save(1, nnx.state(pre))
        pre_step1 = host_copy(nnx.state(pre["model"], nnx.Param))
        train_step(pre, jax.numpy.ones((8, 4)))
        ckpt.save(2, nnx.state(pre))
        pre_step2 = host_copy(nnx.state(pre["model"], nnx.Param))

    run = checkpoint.Checkpointer(tmp_path / "run")
    state, step, source = checkpoint.restore_or_init(run, abstract, init_fn, init_from=None)
    assert (source, step) == ("fresh", 0)
    fresh_params = host_copy(nnx.state(sharding.create_sharded(ctor, mesh)["model"], nnx.Param))

    state, step, source = checkpoint.restore_or_init(run, abstract, init_fn, init_from=str(tmp_path / "pre"))
    assert (source, step) == ("init_from", 0)
    for got, want, fresh in zip(_params(state), pre_step2, fresh_params):
        np.testing.assert_array_equal(got, want)
        assert not np.array_equal(got, fresh)
    # Params only: the optimizer starts over (adam moments zero, step counter zero).
    opt_leaves = jax.tree.leaves(state["opt"])
    assert all(not np.any(np.asarray(x)) for x in opt_leaves)
    assert all(x.sharding == t.sharding for x, t in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)))

    state, _, _ = checkpoint.restore_or_init(run, abstract, init_fn, init_from=f"{tmp_path / 'pre'}:1")
    for got, want in zip(_params(state), pre_step1):
        np.testing.assert_array_equal(got, want)

    run.save(5, state)
    run.wait()
    state, step, source = checkpoint.restore_or_init(run, abstract, init_fn, init_from=str(tmp_path / "pre"))
    assert (source, step) == ("workdir", 5)
    run.close()


def test_init_from_mismatch(tmp_path):
    mesh = sharding.make_mesh(MESH)
    with checkpoint.Checkpointer(tmp_path / "pre") as ckpt:
        ckpt.save(1, nnx.state(sharding.create_sharded(make_ctor(), mesh)))
    ctor = make_ctor(extra=True)  # new head
    _, abstract = sharding.abstract_state(ctor, mesh)
    init_fn = lambda: nnx.state(sharding.create_sharded(ctor, mesh))  # noqa: E731
    run = checkpoint.Checkpointer(tmp_path / "run")
    with pytest.raises(ValueError, match=r"missing from checkpoint.*\(2\): model/head/bias, model/head/kernel"):
        checkpoint.restore_or_init(run, abstract, init_fn, init_from=str(tmp_path / "pre"))
    state, _, source = checkpoint.restore_or_init(run, abstract, init_fn, init_from=str(tmp_path / "pre"), strict=False)
    assert source == "init_from" and state["model"]["head"]["kernel"].get_value().shape == (4, 2)

    ctor = make_ctor(hidden=8)  # a different width: every wi/wo leaf mismatches
    _, abstract = sharding.abstract_state(ctor, mesh)
    with pytest.raises(ValueError, match=r"shape mismatch.*model/wi/kernel \(4, 16\) != \(4, 8\)"):
        checkpoint.restore_or_init(run, abstract, lambda: None, init_from=str(tmp_path / "pre"))
    run.close()


def test_restore_mismatched_structure(tmp_path):
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, {"a": np.zeros((2, 3), np.float32), "b": {"c": np.ones(4, np.float32)}})
        mismatch = r"missing from checkpoint \(1\): b/d(.|\n)*not in the new state \(1\): b/c"
        with pytest.raises(ValueError, match=mismatch):
            ckpt.restore(abstract_state={"a": np.zeros((2, 3), np.float32), "b": {"d": np.ones(4, np.float32)}})
        with pytest.raises(ValueError, match=r"shape mismatch.*a \(2, 3\) != \(3, 2\)"):
            ckpt.restore(abstract_state={"a": np.zeros((3, 2), np.float32), "b": {"c": np.ones(4, np.float32)}})
        with pytest.raises(ValueError, match="no data-iterator state"):
            ckpt.restore(abstract_state={"a": np.zeros((2, 3), np.float32), "b": {"c": np.ones(4, np.float32)}},
                         data_iter=iter(make_dataset()))
        with pytest.raises(FileNotFoundError, match="step 7"):
            ckpt.restore(7, abstract_state={})


def test_interval_max_to_keep_and_tmp_dirs(tmp_path):
    state = {"w": np.arange(3, dtype=np.float32)}
    with checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=2, save_interval_steps=2) as ckpt:
        assert [ckpt.save(s, state) for s in range(1, 7)] == [False, True, False, True, False, True]
        assert ckpt.save(7, state, force=True)  # e.g. on SIGTERM
        assert not ckpt.save(7, state, force=True)  # already there
        ckpt.wait()
        assert ckpt.all_steps() == [6, 7]
        assert ckpt.restore_config() is None
    # A save killed before Orbax finalised it leaves a temporary directory: never "latest".
    os.makedirs(tmp_path / "ckpt" / "9.orbax-checkpoint-tmp-1234" / "state")
    # And a step directory that lost its state (e.g. half-deleted by hand) is skipped too.
    os.makedirs(tmp_path / "ckpt" / "8")
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() == 7
        np.testing.assert_array_equal(ckpt.restore(abstract_state=state)["w"], state["w"])


def test_parse_init_from():
    assert checkpoint.parse_init_from("/runs/pre") == ("/runs/pre", None)
    assert checkpoint.parse_init_from("/runs/pre:1000") == ("/runs/pre", 1000)
    assert checkpoint.parse_init_from("gs://bucket/pre:20") == ("gs://bucket/pre", 20)
    assert checkpoint.parse_init_from("gs://bucket/pre") == ("gs://bucket/pre", None)


def test_relative_directory_saves_and_restores(tmp_path, monkeypatch):
    # Runs are usually started with a relative workdir (workdirs/x); Orbax itself rejects those.
    monkeypatch.chdir(tmp_path)
    state = {"w": np.arange(6, dtype=np.float32)}
    with checkpoint.Checkpointer("workdirs/run/checkpoints") as ckpt:
        assert ckpt.save(5, state, force=True)
    with checkpoint.Checkpointer("workdirs/run/checkpoints") as ckpt:
        assert ckpt.latest_step() == 5
        restored = ckpt.restore(5, {"w": jax.ShapeDtypeStruct((6,), np.float32)})
    np.testing.assert_array_equal(np.asarray(restored["w"]), state["w"])
