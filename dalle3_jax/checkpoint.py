"""Checkpoints: model + optimizer state, data-iterator position and config, saved together.

One Orbax CheckpointManager per run directory. Each step directory is an Orbax Composite:

  state       every array of the training state (params, optimizer moments, step counters, RNG
              keys), as a nested dict keyed by path strings; restored straight into its sharded
              layout on the current mesh, so a run can resume on a different mesh shape.
  state_info  JSON: each state leaf's Variable type ("Param", "OptVariable", ...) and shape, so a
              fine-tune can pick the params out of a pretraining checkpoint without rebuilding it.
  data_iter   the Grain iterator state (one JSON file per process), restored in place so the
              resumed run reads exactly the batches it would have read.
  config      JSON of the run's ml_collections config, for humans and for tools that reload a run.

Orbax finalises a step atomically (a temporary directory renamed into place on local disks, a
commit marker on GCS), so a run killed mid-save never leaves a half-written checkpoint that
`latest_step` would pick. Saving is async:
`save` returns once arrays are copied off the devices, so the caller may donate/overwrite them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

log = logging.getLogger(__name__)

_STATE, _INFO, _DATA, _CONFIG = "state", "state_info", "data_iter", "config"
_MAX_LISTED = 12  # mismatch messages list this many paths per kind, then a count


# ----------------------------------------------------------------------------------------------
# State trees <-> flat {path: leaf}
# ----------------------------------------------------------------------------------------------


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _key_str(entry: Any) -> str:
    for attr in ("key", "idx", "name"):  # DictKey / SequenceKey / GetAttrKey (+ Flattened*)
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def flatten_state(tree: Any) -> tuple[dict[str, Any], Any]:
    """({"model/wi/kernel": leaf, ...}, treedef); nnx Variables count as leaves."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_var)
    flat = {}
    for path, leaf in with_path:
        flat["/".join(_key_str(p) for p in path)] = leaf
    if len(flat) != len(with_path):
        raise ValueError("State has two leaves whose paths render to the same string; rename one.")
    return flat, treedef


def _nest(flat: Mapping[str, Any]) -> dict:
    # Orbax stores nested dicts; nesting by path keeps the on-disk names readable (model.wi.kernel).
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def _unnest(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_unnest(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def _value(leaf: Any) -> Any:
    return leaf.get_value() if _is_var(leaf) else leaf


def _rebuild(treedef: Any, template: dict[str, Any], values: Mapping[str, Any]) -> Any:
    # Put restored arrays back into the caller's structure, Variables keeping their metadata.
    leaves = [t.replace(values[p]) if _is_var(t) else values[p] for p, t in template.items()]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _target(leaf: Any) -> jax.ShapeDtypeStruct:
    """Restore target for one abstract (or concrete) leaf; unsharded leaves go to device 0."""
    value = _value(leaf)
    sharding = getattr(value, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(np.shape(value), value.dtype, sharding=sharding)


def _info(flat: Mapping[str, Any]) -> dict[str, dict]:
    return {
        p: {"type": type(leaf).__name__ if _is_var(leaf) else "array", "shape": list(np.shape(_value(leaf)))}
        for p, leaf in flat.items()
    }


def config_to_json(config: Any) -> dict:
    """A JSON-able dict of an ml_collections config (or any mapping); odd values become strings."""
    if isinstance(config, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        return json.loads(config.to_json_best_effort(sort_keys=True))
    return json.loads(json.dumps(dict(config), default=str, sort_keys=True))


def _listing(title: str, paths: list[str]) -> str:
    shown = ", ".join(paths[:_MAX_LISTED])
    more = f" (+{len(paths) - _MAX_LISTED} more)" if len(paths) > _MAX_LISTED else ""
    return f"  {title} ({len(paths)}): {shown}{more}"


def _mismatches(want: Mapping[str, tuple], have: Mapping[str, tuple]) -> tuple[list, list, list]:
    """(missing from checkpoint, unexpected in checkpoint, shape mismatches) between path->shape maps."""
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    shapes = sorted(f"{p} {tuple(have[p])} != {tuple(want[p])}" for p in set(want) & set(have)
                    if tuple(have[p]) != tuple(want[p]))
    return missing, unexpected, shapes


# ----------------------------------------------------------------------------------------------
# Checkpointer
# ----------------------------------------------------------------------------------------------


class Checkpointer:
    """Async Orbax manager for one run directory.

    Example:
        ckpt = Checkpointer(workdir / "checkpoints", save_interval_steps=1000)
        ckpt.save(step, nnx.state((model, opt)), data_iter=it, config=config)
        state = ckpt.restore(abstract_state=abstract, data_iter=it)  # latest step
        ckpt.close()  # waits for the last async save
    """

    def __init__(
        self,
        directory: str | epath.PathLike,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
        read_only: bool = False,
    ):
        # Orbax requires absolute paths; a relative workdir (the usual `workdirs/x`) is taken
        # relative to the current directory, URLs such as gs://bucket/x are kept as they are.
        text = os.fspath(directory)
        self.directory = epath.Path(text if "://" in text else os.path.abspath(text))
        self.save_interval_steps = max(1, int(save_interval_steps))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,
            save_interval_steps=0 if read_only else 1,  # the interval is applied in `save`
            enable_async_checkpointing=async_save,
            # Leftovers of a save killed mid-way (e.g. preemption) are deleted on start.
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        handlers = {
            _STATE: ocp.StandardCheckpointHandler(),
            _INFO: ocp.JsonCheckpointHandler(),
            _DATA: grain.checkpoint.CheckpointHandler(),
            _CONFIG: ocp.JsonCheckpointHandler(),
        }
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._pending_step: int | None = None  # step of the async save last started

    # -- queries --------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Finalised steps, oldest first (a step still being written in the background is not)."""
        return [s for s in sorted(self._mngr.all_steps()) if self._is_complete(s)]

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def _is_complete(self, step: int) -> bool:
        # Orbax renames a step into place only once complete. Its own step list also holds the
        # step being written asynchronously; that one is silently not "complete" yet. A step
        # directory that lost its state (e.g. half-deleted by hand) is skipped with a warning
        # rather than failing a resume.
        if (self._step_dir(step) / _STATE).exists():
            return True
        if step != self._pending_step:
            log.warning("checkpoint: ignoring incomplete step directory %s", self._step_dir(step))
        return False

    def _items(self, step: int) -> set[str]:
        return {p.name for p in self._step_dir(step).iterdir() if p.is_dir()}

    # -- save -----------------------------------------------------------------------------------

    def save(self, step: int, state: Any, data_iter: Any = None, config: Any = None, force: bool = False) -> bool:
        """Saves if `step` is on the save interval (or `force`); returns whether it did.

        `state` is any pytree of arrays / nnx Variables (typically `nnx.state((model, opt))`).
        Returns once device arrays are copied to host; files are written in the background.
        """
        step = int(step)
        if step in self._mngr.all_steps():
            log.info("checkpoint: step %d already saved in %s", step, self.directory)
            return False
        # A plain interval (Orbax's own policy would also save the first step of every run).
        if not force and step % self.save_interval_steps:
            return False
        flat, _ = flatten_state(state)
        items = {
            _STATE: ocp.args.StandardSave(_nest({p: _value(v) for p, v in flat.items()})),
            _INFO: ocp.args.JsonSave(_info(flat)),
        }
        if data_iter is not None:
            # Grain's handler writes synchronously, so the position is the one at this call even
            # though the arrays finish writing later.
            items[_DATA] = grain.checkpoint.CheckpointSave(data_iter)
        if config is not None:
            items[_CONFIG] = ocp.args.JsonSave(config_to_json(config))
        saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
        if saved:
            self._pending_step = step
            log.info("checkpoint: saving step %d to %s (async)", step, self.directory)
        return bool(saved)

    # -- restore --------------------------------------------------------------------------------

    def _resolve(self, step: int | None) -> int:
        self.wait()  # reading while a save is in flight would miss (or race with) that step
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        elif int(step) not in self.all_steps():
            raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; steps: {self.all_steps()}.")
        return int(step)

    def saved_shapes(self, step: int | None = None) -> dict[str, tuple]:
        """{path: shape} of the arrays stored at `step` (latest by default)."""
        step = self._resolve(step)
        meta = self._mngr.item_metadata(step)[_STATE]
        tree = getattr(meta, "tree", meta)
        return {p: tuple(m.shape) for p, m in _unnest(tree).items()}

    def saved_types(self, step: int | None = None) -> dict[str, str] | None:
        """{path: Variable type name} stored at `step`, or None for checkpoints without it."""
        step = self._resolve(step)
        if _INFO not in self._items(step):
            return None
        info = self._mngr.restore(step, args=ocp.args.Composite(**{_INFO: ocp.args.JsonRestore()}))[_INFO]
        return {p: v["type"] for p, v in info.items()}

    def restore(self, step: int | None = None, abstract_state: Any = None, data_iter: Any = None) -> Any:
        """Restores the state at `step` (latest by default) into `abstract_state`'s structure.

        `abstract_state` is a pytree (e.g. an nnx.State from `sharding.abstract_state`) whose leaves
        are ShapeDtypeStructs or arrays carrying the target sharding on the current mesh. If
        `data_iter` is given, its position is restored in place.
        """
        if abstract_state is None:
            raise ValueError("restore() needs abstract_state (e.g. sharding.abstract_state(ctor, mesh)[1]).")
        step = self._resolve(step)
        flat, treedef = flatten_state(abstract_state)
        missing, unexpected, shapes = _mismatches(
            {p: np.shape(_value(v)) for p, v in flat.items()}, self.saved_shapes(step)
        )
        if missing or unexpected or shapes:
            lines = [f"Checkpoint {self._step_dir(step)} does not match the state being restored:"]
            lines += [_listing(t, x) for t, x in
                      (("missing from checkpoint", missing), ("not in the new state", unexpected),
                       ("shape mismatch (checkpoint != new)", shapes)) if x]
            raise ValueError("\n".join(lines))
        items = {_STATE: ocp.args.StandardRestore(_nest({p: _target(v) for p, v in flat.items()}))}
        if data_iter is not None:
            if _DATA not in self._items(step):
                raise ValueError(f"Checkpoint {self._step_dir(step)} has no data-iterator state to restore.")
            items[_DATA] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
        log.info("checkpoint: restored step %d from %s", step, self.directory)
        return _rebuild(treedef, flat, _unnest(restored[_STATE]))

    def restore_subset(self, step: int | None, abstract_state: Any, keep: Callable[[str, Any], bool]) -> dict[str, Any]:
        """Restores only the leaves of `abstract_state` for which keep(path, leaf) holds, as
        {path: array}. Other leaves stored in the checkpoint are not read."""
        step = self._resolve(step)
        flat, _ = flatten_state(abstract_state)
        target = _nest({p: _target(v) for p, v in flat.items() if keep(p, v)})
        if not target:
            return {}
        restored = ocp.PyTreeCheckpointer().restore(
            self._step_dir(step) / _STATE,
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
            ),
        )
        return _unnest(restored)

    def restore_config(self, step: int | None = None) -> dict | None:
        """The config JSON saved at `step` (latest by default), or None if none was saved."""
        step = self._resolve(step)
        if _CONFIG not in self._items(step):
            return None
        return self._mngr.restore(step, args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()}))[_CONFIG]

    # -- lifecycle ------------------------------------------------------------------------------

    def wait(self) -> None:
        """Blocks until any in-flight async save is on disk (and raises if it failed)."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Waits for the last async save, then releases the manager."""
        self._mngr.wait_until_finished()
        # Orbax 0.12's close() does not wait for the start-up temp-dir cleanup; a short-lived
        # Checkpointer would otherwise leave it running into interpreter shutdown.
        getattr(self._mngr, "_maybe_await_cleanup_tmp_directory", lambda: None)()
        self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Resume order
# ----------------------------------------------------------------------------------------------


def parse_init_from(init_from: str) -> tuple[str, int | None]:
    """"DIR" -> (DIR, None = latest); "DIR:STEP" -> (DIR, STEP). Colons in URLs (gs://) are kept."""
    head, sep, tail = init_from.rpartition(":")
    if sep and tail.isdigit() and head:
        return head, int(tail)
    return init_from, None


def _type_names(kinds: type | tuple[type, ...]) -> set[str]:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return {k.__name__ for k in kinds}


def restore_or_init(
    workdir_ckpt: Checkpointer,
    abstract_state: Any,
    init_fn: Callable[[], Any],
    *,
    init_from: str | None = None,
    data_iter: Any = None,
    init_from_kinds: type | tuple[type, ...] | None = nnx.Param,
    strict: bool = True,
) -> tuple[Any, int, str]:
    """Where a run starts from: (state, step, source) with source "workdir" | "init_from" | "fresh".

    1. The latest checkpoint in the run's own directory (a resumed run: state and data position).
    2. Else `init_from` ("DIR" or "DIR:STEP", another run's checkpoints): a fresh `init_fn()` state
       whose leaves of type `init_from_kinds` (params by default; None = every leaf) are replaced
       by that checkpoint's; the optimizer and data position start fresh, and the step is 0.
       With `strict`, any param missing on either side or with another shape is an error listing
       them; otherwise those are logged and keep their fresh values.
    3. Else a fresh `init_fn()`.
    """
    step = workdir_ckpt.latest_step()
    if step is not None:
        state = workdir_ckpt.restore(step, abstract_state, data_iter=data_iter)
        log.info("checkpoint: resuming from %s at step %d", workdir_ckpt.directory, step)
        return state, step, "workdir"

    if not init_from:
        log.info("checkpoint: no checkpoint in %s and no init_from; starting fresh", workdir_ckpt.directory)
        return init_fn(), 0, "fresh"

    directory, src_step = parse_init_from(init_from)
    src = Checkpointer(directory, read_only=True)
    try:
        try:
            src_step = src._resolve(src_step)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"init_from={init_from!r}: {e}") from None
        flat, _ = flatten_state(abstract_state)

        def wanted(path: str, leaf: Any) -> bool:
            return init_from_kinds is None or (_is_var(leaf) and isinstance(leaf, init_from_kinds))

        want = {p: np.shape(_value(v)) for p, v in flat.items() if wanted(p, v)}
        saved = src.saved_shapes(src_step)
        types = src.saved_types(src_step)
        if init_from_kinds is not None and types is not None:
            kinds = _type_names(init_from_kinds) | {type(flat[p]).__name__ for p in want}
            saved = {p: s for p, s in saved.items() if types.get(p) in kinds}
        elif init_from_kinds is not None:
            # No type record (not written by this module): only the wanted paths can be judged.
            log.warning("checkpoint: %s has no state_info; cannot list its extra params", directory)
            saved = {p: s for p, s in saved.items() if p in want}
        missing, unexpected, shapes = _mismatches(want, saved)
        if missing or unexpected or shapes:
            lines = [f"init_from {directory} step {src_step} does not match the new state's "
                     f"{'params' if init_from_kinds is nnx.Param else 'leaves'}:"]
            lines += [_listing(t, x) for t, x in
                      (("missing from checkpoint (keep fresh init)", missing),
                       ("in checkpoint but not in the new model (ignored)", unexpected),
                       ("shape mismatch, checkpoint != new (keep fresh init)", shapes)) if x]
            if strict:
                lines.append("Pass strict=False to load the matching leaves anyway.")
                raise ValueError("\n".join(lines))
            log.warning("\n".join(lines))
        bad_shape = {s.split(" ", 1)[0] for s in shapes}
        loaded = src.restore_subset(
            src_step, abstract_state, lambda p, v: p in want and p in saved and p not in bad_shape
        )
    finally:
        src.close()

    fresh_flat, fresh_def = flatten_state(init_fn())
    values = {p: loaded.get(p, _value(v)) for p, v in fresh_flat.items()}
    state = _rebuild(fresh_def, fresh_flat, values)
    log.info("checkpoint: initialised %d of %d leaves from %s step %d",
             len(loaded), len(fresh_flat), directory, src_step)
    return state, 0, "init_from"


def load_model_weights(directory: str, model: nnx.Module, *, step: int | None = None, prefix: str = "model") -> int:
    """Loads the weights of `model` from a training run's checkpoints, in place; returns the step.

    `directory` holds step directories (a run's `workdir/checkpoints`); the model's state is
    read from the `prefix` subtree of the saved train state, straight into the shardings the
    model already has. Evaluation, recaptioning and sampling load finished runs this way.
    """
    ckpt = Checkpointer(directory, read_only=True)
    try:
        step = ckpt._resolve(step)
        tree = {prefix: nnx.state(model)}
        flat, treedef = flatten_state(tree)
        loaded = ckpt.restore_subset(step, tree, lambda p, v: True)
    finally:
        ckpt.close()
    missing = sorted(set(flat) - set(loaded))
    if missing:
        raise ValueError(f"{directory} step {step} lacks {len(missing)} of the model's arrays: "
                         + _listing("missing", missing))
    nnx.update(model, _rebuild(treedef, flat, loaded)[prefix])
    return step
