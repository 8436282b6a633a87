"""Device mesh, logical axis rules, and sharded creation of models and batches.

Every weight in the library names its dimensions with *logical* axis names ("embed", "mlp",
"heads", ...). One table, `LOGICAL_AXIS_RULES`, maps those names onto the three mesh axes:

  data    pure data parallelism: parameters are replicated, the batch is split.
  fsdp    fully sharded data parallelism: the batch is split *and* every weight is split along
          its "embed" dimension, so each device stores 1/fsdp of the parameters and optimizer
          state; XLA all-gathers a weight just before it is used.
  tensor  tensor (model) parallelism: attention heads, MLP hidden units and the vocabulary are
          split, so matmuls themselves are partitioned (Megatron style).

The same model code runs unchanged on 1 CPU, 8 virtual CPU devices, a GPU or a TPU pod: only
the mesh config changes. Usage in a model:

    self.wi = nnx.Linear(d, f, kernel_init=sharding.logical(init, ("embed", "mlp")), rngs=rngs)

and in a trainer:

    mesh = sharding.make_mesh(config.mesh)
    model, opt = sharding.create_sharded(lambda: make_model_and_optimizer(config), mesh)
    batch = sharding.global_batch(next(local_iter), mesh)
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import flax.core.spmd
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension is split over both data-parallel axes; fsdp is data parallel for activations.
DATA_AXES = ("data", "fsdp")

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

# The one logical -> mesh table. A weight dim is split over the mapped mesh axes when its size
# divides evenly; otherwise it is replicated for that dim (see `spec_for`).
LOGICAL_AXIS_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # --- activations and data ---
    ("batch", DATA_AXES),  # examples: split over every data-parallel device
    ("length", None),  # token positions: sequences are short; no sequence parallelism yet
    ("height", None),  # image rows/cols of activations: convs need their neighbours
    ("width", None),
    ("act_embed", None),  # model width of activations: kept whole so norms/residuals stay local
    ("act_mlp", "tensor"),  # hidden units of an MLP activation follow the sharded "mlp" weights
    ("act_heads", "tensor"),  # per-head activations follow the sharded head weights
    ("act_vocab", "tensor"),  # logits follow the sharded output embedding
    # --- weights ---
    ("embed", "fsdp"),  # model width: the FSDP axis, present in (almost) every matrix
    ("mlp", "tensor"),  # MLP hidden units: column-parallel in, row-parallel out
    ("heads", "tensor"),  # attention heads: each tensor shard owns whole heads
    ("kv", None),  # per-head feature dim: small, and splitting it would split a dot product
    ("vocab", "tensor"),  # token embedding / output projection rows
    ("conv_spatial", None),  # kernel height/width (3x3): tiny
    ("conv_in", "fsdp"),  # input channels play the role of "embed" for conv weights
    ("conv_out", "tensor"),  # output channels: tensor-parallel like "mlp"
    ("norm", None),  # norm scales/biases: tiny, replicate to avoid gathers in every layer
    ("layers", None),  # stacked (scanned) layers: every device runs every layer
    ("pos", None),  # learned position tables: positions are indexed, not contracted
    ("time", None),  # diffusion timestep embedding frequencies
)


# Named sharding strategies (`mesh.strategy`); each says which axis takes the devices left over.
STRATEGIES = {
    "dp": "pure data parallel: every device holds the whole model and a slice of the batch (data=-1; "
          "fsdp and tensor must be 1)",
    "fsdp": "fully sharded data parallel: parameters and optimizer state split over the devices (fsdp=-1; "
            "data = the given size if > 0, e.g. the host count, else 1; tensor must be 1)",
    "fsdp_tp": "FSDP + tensor parallel: heads, MLP units and vocabulary split over `tensor` devices "
               "(the given size if > 1, else 2), FSDP over the rest (fsdp=-1; data as for fsdp)",
}


def apply_strategy(mesh_cfg: Mapping[str, Any]) -> dict[str, int]:
    """Axis sizes of a mesh config with its `strategy` preset applied (see STRATEGIES); the
    `strategy` and `num_devices` keys are dropped, an empty strategy keeps the sizes as given."""
    cfg = dict(mesh_cfg)
    cfg.pop("num_devices", None)
    strategy = cfg.pop("strategy", "") or ""
    if not strategy:
        return cfg
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown mesh.strategy {strategy!r}; valid: {', '.join(STRATEGIES)}, "
                         "or '' for the sizes as given.")
    data, fsdp, tensor = (int(cfg.get(a, 1)) for a in MESH_AXES)
    if strategy == "dp":
        if fsdp != 1 or tensor != 1:
            raise ValueError(f"mesh.strategy='dp' replicates the model: fsdp and tensor must be 1, got "
                             f"fsdp={fsdp}, tensor={tensor}.")
        return {**cfg, "data": -1, "fsdp": 1, "tensor": 1}
    if strategy == "fsdp" and tensor != 1:
        raise ValueError(f"mesh.strategy='fsdp' has no tensor parallelism: tensor must be 1, got {tensor} "
                         "(use strategy='fsdp_tp').")
    tensor = 1 if strategy == "fsdp" else (tensor if tensor > 1 else 2)
    return {**cfg, "data": data if data > 0 else 1, "fsdp": -1, "tensor": tensor}


def mesh_config() -> ml_collections.ConfigDict:
    """Default mesh config: all devices data parallel. Sizes multiply to the device count."""
    cfg = ml_collections.ConfigDict()
    cfg.strategy = ""  # "" = the sizes below; or a preset: dp | fsdp | fsdp_tp (see STRATEGIES)
    cfg.data = -1  # pure data parallel replicas; -1 = whatever the other axes leave over
    cfg.fsdp = 1  # shard params + optimizer state (and the batch) this many ways
    cfg.tensor = 1  # split heads / MLP / vocab this many ways (keep within one host's fast links)
    cfg.num_devices = 0  # use only the first N devices (e.g. 1 for a single-device reference); 0 = all
    return cfg


def make_mesh(mesh_cfg: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a ("data", "fsdp", "tensor") mesh; at most one axis may be -1 (fill).

    `mesh_cfg` holds the axis sizes, or a `strategy` preset (see STRATEGIES), and optionally
    `num_devices` (use only the first N devices)."""
    mesh_cfg = dict(mesh_config() if mesh_cfg is None else mesh_cfg)
    devices = list(jax.devices() if devices is None else devices)
    limit = int(mesh_cfg.get("num_devices", 0) or 0)
    mesh_cfg = apply_strategy(mesh_cfg)
    if limit:
        if limit > len(devices):
            raise ValueError(f"mesh.num_devices={limit} but only {len(devices)} devices are available")
        devices = devices[:limit]
    unknown = set(dict(mesh_cfg).keys()) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"Unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}.")
    sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
    fill = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
    bad = [f"{a}={s}" for a, s in zip(MESH_AXES, sizes) if s == 0 or s < -1]
    if bad or len(fill) > 1:
        raise ValueError(
            f"Invalid mesh sizes {dict(zip(MESH_AXES, sizes))}: each size must be >= 1, "
            f"and at most one may be -1 (fill); got {bad or fill}."
        )
    n = len(devices)
    fixed = math.prod(s for s in sizes if s != -1)
    if fill:
        if n % fixed:
            raise ValueError(
                f"Mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes multiply to {fixed}, "
                f"which does not divide the {n} available devices."
            )
        sizes[sizes.index(-1)] = n // fixed
    elif fixed != n:
        raise ValueError(
            f"Mesh {dict(zip(MESH_AXES, sizes))} has {fixed} devices, but {n} devices are available; "
            "make the sizes multiply to the device count or set one axis to -1."
        )
    # Auto axes: XLA propagates shardings from our annotations (Explicit axes would make every
    # op's sharding part of its type, which the models do not need).
    return jax.make_mesh(
        tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def data_parallel_size(mesh: Mesh) -> int:
    """Number of ways the batch is split (data x fsdp)."""
    return math.prod(mesh.shape[a] for a in DATA_AXES if a in mesh.shape)


# ----------------------------------------------------------------------------------------------
# Annotating parameters
# ----------------------------------------------------------------------------------------------


def _check_names(names: Sequence[str | None], rules: Rules = LOGICAL_AXIS_RULES) -> tuple:
    known = dict(rules)
    names = tuple(names)
    for name in names:
        if name is not None and name not in known:
            raise ValueError(f"Unknown logical axis {name!r} in {names}; known names: {sorted(known)}.")
    return names


def metadata(names: Sequence[str | None]) -> dict[str, Any]:
    """Variable metadata carrying logical names, e.g. `nnx.Linear(..., kernel_metadata=metadata(n))`.

    Eager sharding is turned off: with it Flax would shard each variable the moment it is created,
    which needs a mesh in scope and mesh-axis names. Instead the names stay logical and
    `create_sharded` places every variable through `jax.jit(out_shardings=...)`.
    """
    return {"out_sharding": _check_names(names), "eager_sharding": False}


def logical(init_fn: Callable[..., jax.Array], names: Sequence[str | None]) -> Callable[..., jax.Array]:
    """Wraps an initializer so the variable it creates carries logical axis names."""
    return nnx.with_partitioning(init_fn, _check_names(names), eager_sharding=False)


def param(value: jax.Array, names: Sequence[str | None], kind: type[nnx.Variable] = nnx.Param) -> nnx.Variable:
    """An `nnx.Param` (or other Variable type) with logical axis names."""
    return kind(value, **metadata(names))


def names_of(variable: nnx.Variable) -> tuple | None:
    """Logical names of a variable, or None if it has none (it is then replicated)."""
    names = variable.get_metadata().get("out_sharding")
    return tuple(names) if names else None


# ----------------------------------------------------------------------------------------------
# Logical names -> PartitionSpec / NamedSharding
# ----------------------------------------------------------------------------------------------


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_mesh(pspec_tree: Any, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """Maps a tree of logical specs (PartitionSpec or tuple of names) to mesh PartitionSpecs.

    Shape-agnostic: no divisibility check (use `spec_for` / `state_shardings` for real arrays).
    """
    is_spec = lambda x: x is None or isinstance(x, (PartitionSpec, tuple))  # noqa: E731
    return jax.tree.map(lambda spec: spec_for(spec, None, None, rules), pspec_tree, is_leaf=is_spec)


@functools.lru_cache(maxsize=4096)
def _note_fallback(name: str, dim: int, wanted: tuple, used: tuple, why: str) -> None:
    # Cached so that one note is logged per distinct case, not one per layer.
    log.info("sharding: logical axis %r (size %d) wants mesh axes %s, uses %s (%s)", name, dim, wanted, used, why)


def spec_for(
    names: Sequence[str | None] | None,
    shape: Sequence[int] | None,
    mesh: Mesh | jax.sharding.AbstractMesh | None,
    rules: Rules = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dims carry logical `names`.

    For each dim the mapped mesh axes are kept left to right while their product divides the dim
    size; a mesh axis already used by an earlier dim is skipped (a mesh axis may appear once per
    spec). So a 3-wide bias on a tensor=2 mesh is simply replicated instead of failing, which lets
    tiny test models run on 8 devices. With `shape`/`mesh` None those checks are skipped.
    """
    if not names:
        return PartitionSpec()
    names = _check_names(names, rules)
    if shape is not None and len(names) != len(shape):
        raise ValueError(f"Logical names {names} do not match the rank of shape {tuple(shape)}.")
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        wanted = _as_tuple(table[name] if name else None)
        if mesh is not None:
            # Size-1 axes shard nothing; leaving them out keeps specs canonical (P() == replicated).
            wanted = tuple(a for a in wanted if mesh.shape.get(a, 1) > 1)
        kept: list[str] = []
        for axis in wanted:
            if axis in used:
                _note_fallback(name, -1 if shape is None else shape[i], wanted, tuple(kept),
                               f"{axis!r} already shards another dim")
                break
            if shape is not None and mesh is not None:
                ways = math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]
                if shape[i] % ways:
                    _note_fallback(name, shape[i], wanted, tuple(kept), f"not divisible by {ways}")
                    break
            kept.append(axis)
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(tree: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """NamedSharding tree for an nnx.State (abstract or concrete), a graph node, or a pytree.

    Variables map to Variables holding a NamedSharding (the structure `jax.jit(out_shardings=)`
    expects for an nnx.State); variables without names and plain arrays are replicated.
    """
    if not isinstance(tree, nnx.State) and _contains_graph(tree):
        tree = nnx.state(tree)

    def one(x):
        if _is_var(x):
            value = x.get_value()
            return x.replace(NamedSharding(mesh, spec_for(names_of(x), np.shape(value), mesh, rules)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, tree, is_leaf=_is_var)


def _contains_graph(tree: Any) -> bool:
    is_node = lambda x: isinstance(x, nnx.Pytree)  # noqa: E731  (nnx.Module is an nnx.Pytree)
    return any(is_node(x) for x in jax.tree.leaves(tree, is_leaf=is_node))


def flax_rules(rules: Rules = LOGICAL_AXIS_RULES):
    """Context that lets Flax's own helpers (`nnx.eval_shape` under a mesh, `nnx.get_partition_spec`)
    translate logical names; they do so without our divisibility fallback, so the shardings
    used for placement always come from `state_shardings`."""
    return flax.core.spmd.logical_axis_rules(tuple(rules))


def abstract_state(ctor: Callable[[], Any], mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> tuple[Any, Any]:
    """(graphdef, abstract state) of `ctor()` with no allocation; each leaf is a ShapeDtypeStruct
    carrying its NamedSharding on `mesh` (the target Orbax needs to restore sharded)."""
    with jax.set_mesh(mesh), flax_rules(rules):
        graphdef, abs_state = nnx.split(nnx.eval_shape(ctor))
        shardings = state_shardings(abs_state, mesh, rules)
    return graphdef, with_shardings(abs_state, shardings)


def with_shardings(abs_state: Any, shardings: Any) -> Any:
    """Attaches a sharding tree to a tree of abstract (or concrete) values as ShapeDtypeStructs."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s), abs_state, shardings)


def create_sharded(ctor: Callable[[], Any], mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """Runs `ctor()` (a model, or e.g. a (model, optimizer) tuple) with every variable born sharded.

    The shapes come from `nnx.eval_shape` (no memory); the real initialisation runs inside one
    jit whose out_shardings are the rule-derived shardings, so XLA computes each shard on its own
    device and no full copy of the parameters ever exists on a single device. Random values do
    not depend on the mesh (threefry is partitionable), so any mesh gives the same model.
    """
    with jax.set_mesh(mesh), flax_rules(rules):
        graphdef, abs_state = nnx.split(nnx.eval_shape(ctor))
        shardings = state_shardings(abs_state, mesh, rules)
        state = jax.jit(lambda: nnx.state(ctor()), out_shardings=shardings)()
        return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------------
# Batches and activations
# ----------------------------------------------------------------------------------------------


def batch_sharding(mesh: Mesh, ndim: int | None = None) -> NamedSharding:
    """Leading (batch) dim split over the data-parallel axes, the rest replicated."""
    axes = tuple(a for a in DATA_AXES if a in mesh.shape)
    if ndim == 0:
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, PartitionSpec(axes))


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's local batch slice into global, batch-sharded jax.Arrays.

    Each process passes only the examples it loaded (global batch / process count); the global
    array is their concatenation along the batch dim. Scalars are replicated.
    """
    n_local = _local_batch_shards(mesh)

    def one(path, x):
        x = np.asarray(x)
        if x.ndim and x.shape[0] % n_local:
            raise ValueError(
                f"Batch entry {jax.tree_util.keystr(path)} has local batch size {x.shape[0]}, which "
                f"is not divisible by the {n_local} data-parallel shards on this process "
                f"(data_parallel_size={data_parallel_size(mesh)}, processes={jax.process_count()})."
            )
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree_util.tree_map_with_path(one, dict(local_batch))


def replicated_to_global(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Global batch-sharded arrays from a batch that every process holds whole (evaluation sets,
    prompts): each process places only its devices' rows. On one process this equals
    `global_batch`; across processes, `global_batch` would instead concatenate the copies."""

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim), lambda index: x[index])

    return {k: one(v) for k, v in dict(batch).items()}


def to_host(tree: Any) -> Any:
    """numpy copies of a tree of jax.Arrays, whole on every process: arrays that span other
    processes' devices are all-gathered (every process must call this together)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def _local_batch_shards(mesh: Mesh) -> int:
    """How many distinct batch slices this process's devices hold (data x fsdp / processes when
    the data axes span all processes)."""
    dp = data_parallel_size(mesh)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((dp,))
    return len({idx[0].start for idx in index_map.values()})


def constrain(x: jax.Array, names: Sequence[str | None], rules: Rules = LOGICAL_AXIS_RULES) -> jax.Array:
    """Sharding hint for an activation (inside jit); a no-op when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(names, x.shape, mesh, rules))
