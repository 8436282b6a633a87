"""Mesh construction, logical axis rules, sharded creation, and mesh-independence of training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dalle3_jax import sharding

MESHES = {
    "data8": {"data": 8, "fsdp": 1, "tensor": 1},
    "data2_fsdp4": {"data": 2, "fsdp": 4, "tensor": 1},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
}


class MLP(nnx.Module):
    """Tiny transformer-style MLP block with every kind of annotation the rules must handle."""

    def __init__(self, rngs: nnx.Rngs, d: int = 8, hidden: int = 32, out: int = 3):
        init = nnx.initializers.lecun_normal()
        self.norm = nnx.LayerNorm(
            d, scale_init=sharding.logical(nnx.initializers.ones_init(), ("norm",)),
            bias_init=sharding.logical(nnx.initializers.zeros_init(), ("norm",)), rngs=rngs,
        )
        self.wi = nnx.Linear(
            d, hidden, kernel_init=sharding.logical(init, ("embed", "mlp")),
            bias_init=sharding.logical(nnx.initializers.zeros_init(), ("mlp",)), rngs=rngs,
        )
        self.wo = nnx.Linear(hidden, d, kernel_metadata=sharding.metadata(("mlp", "embed")), rngs=rngs)
        # `out` = 3 divides no mesh axis: exercises the replicate-on-indivisible fallback.
        self.head = nnx.Linear(d, out, kernel_init=sharding.logical(init, ("embed", "vocab")), rngs=rngs)
        self.head.bias = sharding.param(jnp.zeros((out,)), ("vocab",))

    def __call__(self, x):
        h = self.norm(x)
        h = sharding.constrain(jax.nn.gelu(self.wi(h)), ("batch", "act_mlp"))
        return self.head(x + self.wo(h))


def make_model_and_opt():
    model = MLP(nnx.Rngs(0))
    return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


# ---------------------------------------------------------------------------------------------
# Mesh
# ---------------------------------------------------------------------------------------------


def test_default_mesh_fills_data(n_devices):
    mesh = sharding.make_mesh(sharding.mesh_config())
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": n_devices, "fsdp": 1, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert sharding.data_parallel_size(mesh) == n_devices


def test_mesh_fill_other_axis():
    cfg = sharding.mesh_config()
    cfg.data, cfg.fsdp = 2, -1
    mesh = sharding.make_mesh(cfg)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert sharding.data_parallel_size(mesh) == 8
    one = sharding.make_mesh({"data": -1}, devices=jax.devices()[:1])
    assert one.devices.size == 1


def test_strategy_presets():
    def shape(**cfg):
        return dict(sharding.make_mesh(dict(sharding.mesh_config(), **cfg)).shape)

    assert shape(strategy="dp") == {"data": 8, "fsdp": 1, "tensor": 1}
    assert shape(strategy="fsdp") == {"data": 1, "fsdp": 8, "tensor": 1}
    assert shape(strategy="fsdp", data=2) == {"data": 2, "fsdp": 4, "tensor": 1}  # e.g. 2 hosts x FSDP
    assert shape(strategy="fsdp_tp") == {"data": 1, "fsdp": 4, "tensor": 2}
    assert shape(strategy="fsdp_tp", tensor=4) == {"data": 1, "fsdp": 2, "tensor": 4}
    assert shape(strategy="fsdp_tp", data=2, num_devices=4) == {"data": 2, "fsdp": 1, "tensor": 2}
    with pytest.raises(ValueError, match="strategy='dp' replicates the model: fsdp and tensor must be 1"):
        shape(strategy="dp", tensor=2)
    with pytest.raises(ValueError, match="use strategy='fsdp_tp'"):
        shape(strategy="fsdp", tensor=2)
    with pytest.raises(ValueError, match="Unknown mesh.strategy 'zero3'; valid: dp, fsdp, fsdp_tp"):
        shape(strategy="zero3")


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"data": 3, "fsdp": 1, "tensor": 1}, r"3 devices, but 8 devices"),
        ({"data": -1, "fsdp": 3, "tensor": 1}, r"multiply to 3.*8 available"),
        ({"data": -1, "fsdp": -1, "tensor": 1}, r"at most one may be -1"),
        ({"data": 0, "fsdp": 8, "tensor": 1}, r"must be >= 1"),
        ({"data": -1, "pipeline": 2}, r"Unknown mesh axes \['pipeline'\]"),
    ],
)
def test_mesh_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(cfg)


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------


def test_rules_table_is_one_to_one():
    names = [name for name, _ in sharding.LOGICAL_AXIS_RULES]
    assert len(names) == len(set(names))
    for _, axes in sharding.LOGICAL_AXIS_RULES:
        for axis in sharding._as_tuple(axes):
            assert axis in sharding.MESH_AXES


def test_logical_to_mesh():
    tree = {"x": ("batch", "length", "act_embed"), "w": P("embed", "mlp"), "n": None, "dup": ("embed", "conv_in")}
    out = sharding.logical_to_mesh(tree)
    assert out["x"] == P(("data", "fsdp"), None, None)
    assert out["w"] == P("fsdp", "tensor")
    assert out["n"] == P()
    assert out["dup"] == P("fsdp", None)  # a mesh axis may shard only one dim


def test_unknown_logical_name_is_rejected():
    with pytest.raises(ValueError, match="Unknown logical axis 'emebd'"):
        sharding.logical(nnx.initializers.zeros_init(), ("emebd", "mlp"))


def test_spec_for_fallback():
    mesh = sharding.make_mesh(MESHES["data2_fsdp2_tensor2"])
    assert sharding.spec_for(("embed", "mlp"), (8, 32), mesh) == P("fsdp", "tensor")
    assert sharding.spec_for(("embed", "vocab"), (8, 3), mesh) == P("fsdp", None)
    # batch 6 divides data=2 but not data x fsdp = 4: keep the prefix that divides.
    assert sharding.spec_for(("batch",), (6,), mesh) == P("data")
    with pytest.raises(ValueError, match="rank"):
        sharding.spec_for(("embed",), (8, 8), mesh)


# ---------------------------------------------------------------------------------------------
# Sharded creation and training
# ---------------------------------------------------------------------------------------------


EXPECTED_SPECS = {
    # (parameter path) -> spec per mesh. Derived by hand from the rules table.
    "data8": {"wi.kernel": P(None, None), "wo.kernel": P(None, None), "head.bias": P(None), "norm.scale": P(None)},
    "data2_fsdp4": {"wi.kernel": P("fsdp", None), "wo.kernel": P(None, "fsdp"), "head.bias": P(None),
                    "head.kernel": P("fsdp", None), "norm.scale": P(None)},
    "data2_fsdp2_tensor2": {"wi.kernel": P("fsdp", "tensor"), "wi.bias": P("tensor"), "wo.kernel": P("tensor", "fsdp"),
                            "head.kernel": P("fsdp", None), "head.bias": P(None), "norm.scale": P(None)},
}


def _get(model, dotted):
    obj = model
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _same(spec_a, spec_b):
    # P(None, None) and P() mean the same placement; compare padded.
    n = max(len(spec_a), len(spec_b))
    return tuple(spec_a) + (None,) * (n - len(spec_a)) == tuple(spec_b) + (None,) * (n - len(spec_b))


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_params_born_sharded(mesh_name):
    mesh = sharding.make_mesh(MESHES[mesh_name])
    model, opt = sharding.create_sharded(make_model_and_opt, mesh)
    for path, spec in EXPECTED_SPECS[mesh_name].items():
        value = _get(model, path).get_value()
        assert isinstance(value.sharding, jax.sharding.NamedSharding), path
        assert value.sharding.mesh == mesh
        assert _same(value.sharding.spec, spec), (path, value.sharding.spec, spec)
    # Optimizer moments follow their parameter (Flax copies the names onto the optimizer state).
    mu = opt.opt_state[0].mu
    assert _same(mu["wi"]["kernel"].get_value().sharding.spec, EXPECTED_SPECS[mesh_name]["wi.kernel"])
    # The abstract state used as a restore target agrees with the concrete one.
    _, abstract = sharding.abstract_state(make_model_and_opt, mesh)
    concrete = nnx.state((model, opt))
    for a, c in zip(jax.tree.leaves(abstract), jax.tree.leaves(concrete)):
        assert a.shape == c.shape and a.sharding == c.sharding


def test_values_do_not_depend_on_mesh():
    one = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    eight = sharding.make_mesh(MESHES["data2_fsdp2_tensor2"])
    a, _ = sharding.create_sharded(make_model_and_opt, one)
    b, _ = sharding.create_sharded(make_model_and_opt, eight)
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _train_losses(mesh, steps=3):
    model, opt = sharding.create_sharded(make_model_and_opt, mesh)
    rng = np.random.default_rng(0)
    batches = [
        {"x": rng.normal(size=(16, 8)).astype(np.float32), "y": rng.integers(0, 3, size=(16,)).astype(np.int32)}
        for _ in range(steps)
    ]

    @nnx.jit(donate_argnums=(0, 1))
    def train_step(model, opt, batch):
        def loss_fn(model):
            logits = model(batch["x"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = []
    with jax.set_mesh(mesh):
        for b in batches:
            losses.append(float(train_step(model, opt, sharding.global_batch(b, mesh))))
    # The step must keep the rule-derived placement, not drift to whatever XLA prefers.
    want = sharding.state_shardings(nnx.state((model, opt)), mesh)
    for x, s in zip(jax.tree.leaves(nnx.state((model, opt))), jax.tree.leaves(want)):
        assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
    return np.array(losses)


def test_training_is_mesh_independent():
    reference = _train_losses(sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    assert np.all(np.isfinite(reference)) and reference[-1] < reference[0]
    for name, cfg in MESHES.items():
        np.testing.assert_allclose(_train_losses(sharding.make_mesh(cfg)), reference, atol=1e-5, err_msg=name)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def test_global_batch_shards_batch_dim():
    mesh = sharding.make_mesh(MESHES["data2_fsdp2_tensor2"])
    local = {"image": np.arange(8 * 4 * 4 * 3, dtype=np.float32).reshape(8, 4, 4, 3), "id": np.arange(8)}
    batch = sharding.global_batch(local, mesh)
    assert batch["image"].shape == (8, 4, 4, 3)  # one process: local == global
    assert batch["image"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(batch["image"]), local["image"])
    # Each of the 4 data shards holds 2 examples; tensor-axis replicas hold the same ones.
    shard_rows = {s.index[0].start: s.data.shape[0] for s in batch["id"].addressable_shards}
    assert shard_rows == {0: 2, 2: 2, 4: 2, 6: 2}
    with pytest.raises(ValueError, match="local batch size 6.*4 data-parallel shards"):
        sharding.global_batch({"x": np.zeros((6, 2))}, mesh)


def test_constrain_is_noop_without_mesh():
    x = jnp.ones((4, 8))
    assert sharding.constrain(x, ("batch", "act_embed")) is x
