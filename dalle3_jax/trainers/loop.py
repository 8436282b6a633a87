"""The one training loop that every stage shares.

A stage (captioner pretraining / fine-tuning, T2I diffusion, the evaluation CLIP, ...) describes
itself as a `Task`: how to build its model, its loss, its training data and its evaluations.
`train_and_evaluate(config, workdir)` does everything else, the same way for every stage:

  1. mesh from `config.mesh`; the model and optimizer are born sharded (jit of the initialiser
     with out_shardings from `nnx.eval_shape`, see sharding.create_sharded);
  2. resume: the workdir's latest checkpoint (state + data position), else `config.init_from`
     (params of another run, e.g. a fine-tune from a pretrain), else fresh;
  3. a jitted train step with the state donated; its compiled memory use is logged once;
  4. the loop: NaN/Inf guard, console progress, TensorBoard + JSONL metrics, periodic evals and
     async checkpoints; SIGTERM/SIGINT save a checkpoint before the run stops, so a preempted
     run resumes where it was.

Config fields read here (each stage's config file documents them): trainer, total_steps,
log_every, eval_every, checkpoint_every, keep_checkpoints, seed, init_from, mesh, optim.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from dalle3_jax import checkpoint as checkpoint_lib
from dalle3_jax import metrics as metrics_lib
from dalle3_jax import optim, sharding

log = logging.getLogger(__name__)

LossFn = Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


class TrainState(nnx.Module):
    """Everything the train step updates: the model, its optimizer and a task's extra state
    (e.g. EMA weights of a diffusion model). Checkpointed as one nnx.State."""

    def __init__(self, model: nnx.Module, tx, extra: nnx.Module | None = None):
        self.model = model
        self.opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
        self.extra = extra


@dataclasses.dataclass
class Task:
    """What a stage contributes to the loop.

    Attributes:
      make_model: builds the model from scratch (called inside sharded initialisation).
      loss_fn: (model, batch, rng) -> (scalar loss, metrics); differentiated w.r.t. the params.
      train_data: builds the host-side Grain loader of training batches (dicts of numpy).
      evaluate: (model, step) -> {"scalars": {...}, "texts": {...}, "images": {...}}; runs on
        every process (its jitted parts are sharded), the loop writes only on process 0.
      batch_keys: keys of a host batch that go to the devices.
      make_extra: builds the task's extra state (e.g. EMA) from the freshly built model.
      after_update: (state, step) -> None, runs inside the jitted step after the optimizer update
        (e.g. an EMA update); must only use jax operations.
      examples_per_step: for the examples/s figure of the progress line.
      eval_model: TrainState -> the module `evaluate` receives (e.g. the EMA weights in
        `state.extra`); default: the trained model.
      prepare_batch: global device batch -> the batch loss_fn reads, run outside the train
        step (e.g. images -> latents through a frozen autoencoder, whose weights thus stay out
        of the train state); default: the batch as loaded.
      init_weights: TrainState -> None, fills weights that do not come from an initialiser (e.g.
        a pretrained text encoder) into a fresh state, outside jit; not called on resume, whose
        checkpoint already holds them.
    """

    make_model: Callable[[], nnx.Module]
    loss_fn: LossFn
    train_data: Callable[[], Any]
    evaluate: Callable[[nnx.Module, int], Mapping[str, Any]] | None = None
    batch_keys: tuple[str, ...] = ("image", "tokens", "text_len")
    make_extra: Callable[[nnx.Module], nnx.Module] | None = None
    after_update: Callable[[TrainState, jax.Array], None] | None = None
    examples_per_step: int | None = None
    eval_model: Callable[[TrainState], nnx.Module] | None = None
    prepare_batch: Callable[[Mapping[str, jax.Array]], Mapping[str, jax.Array]] | None = None
    init_weights: Callable[[TrainState], None] | None = None


def loop_config() -> ml_collections.ConfigDict:
    """The loop's own config fields, with defaults; stage configs start from this."""
    c = ml_collections.ConfigDict()
    c.trainer = ""  # which Task to build (see dalle3_jax.trainers.TRAINERS)
    c.total_steps = 1000  # optimizer steps of the whole run (resumes count toward it)
    c.log_every = 50  # steps between metric writes / progress lines / NaN checks
    c.eval_every = 500  # steps between evaluations (and one at the end); 0 = only at the end
    c.checkpoint_every = 500  # steps between checkpoints (and one at the end)
    c.keep_checkpoints = 2  # newest checkpoints kept on disk
    c.seed = 0  # model init and per-step randomness (dropout, sampling, noise)
    c.init_from = ""  # "DIR" or "DIR:STEP" of another run whose params start this one
    # False: params that init_from lacks, or has with another shape, keep their fresh init and
    # params it has that the new model lacks are ignored (all listed in the log); True: an error.
    c.init_strict = True
    c.record_examples = False  # log each step's example indices to DIR/examples/ (exactly-once audits)
    # Compute dtype of every sub-model: "float32" | "bfloat16" (bf16 matmuls and convolutions; the
    # parameters, gradients, optimizer state, EMA, norms, softmax, logits and losses stay float32);
    # "" = each model block's own `dtype` field. Applied by models.with_compute_dtype.
    c.compute_dtype = ""
    c.mesh = sharding.mesh_config()
    c.optim = optim.default_config()
    return c


def smoke_settings(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a stage config's loop and input to a seconds-long test run: 4 steps of batch 16,
    metrics every 2 steps, checkpoints at 2 and 4, one evaluation at the end."""
    c.total_steps = 4
    c.log_every = 2
    c.eval_every = 0
    c.checkpoint_every = 2
    c.optim.warmup_steps = 1
    c.input.global_batch_size = 16
    c.input.read_threads = 1
    return c


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks, so it can checkpoint before exiting."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second signal: stop right away
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("received signal %d: saving a checkpoint and stopping", signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _default_step(task: Task) -> Callable[[TrainState, Mapping[str, jax.Array], jax.Array], dict]:
    def step(ts: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array) -> dict:
        def loss(model):
            return task.loss_fn(model, batch, rng)

        (value, metrics), grads = nnx.value_and_grad(loss, has_aux=True)(ts.model)
        ts.opt.update(ts.model, grads)
        if task.after_update is not None:
            task.after_update(ts, ts.opt.step.value)
        metrics = dict(metrics)
        metrics["loss"] = value
        metrics["grad_norm"] = optax.global_norm(grads)
        return metrics

    return step


def compile_train_step(task: Task, ts: TrainState, example_batch: Mapping[str, jax.Array], rng: jax.Array):
    """Jits and compiles the train step for `ts`; returns (graphdef, compiled step, memory text).

    The step is a pure function of the state (donated, so its buffers are reused in place) with
    the output state pinned to the input shardings, so the layout never drifts between steps.
    """
    graphdef, state = nnx.split(ts)
    body = _default_step(task)

    def pure_step(state, batch, rng):
        ts = nnx.merge(graphdef, state)
        step_metrics = body(ts, batch, rng)
        return nnx.state(ts), step_metrics

    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    jitted = jax.jit(pure_step, donate_argnums=(0,), out_shardings=(state_shardings, None))
    compiled = jitted.lower(state, example_batch, rng).compile()
    return graphdef, compiled, _memory_text(compiled)


def _memory_text(compiled) -> str:
    try:
        m = compiled.memory_analysis()
    except Exception as e:  # some backends do not report it
        return f"memory analysis unavailable ({type(e).__name__})"
    if m is None:
        return "memory analysis unavailable"
    mib = lambda b: b / 2**20  # noqa: E731
    return (f"per device: arguments {mib(m.argument_size_in_bytes):.1f} MiB, outputs "
            f"{mib(m.output_size_in_bytes):.1f} MiB, temporaries {mib(m.temp_size_in_bytes):.1f} MiB, "
            f"code {mib(m.generated_code_size_in_bytes):.1f} MiB")


def _host_batches(loader_iter: Iterator, mesh, keys: tuple[str, ...], counters: dict,
                  examples: ExampleLog | None = None) -> Iterator[dict]:
    for host in loader_iter:
        skipped = host.get("skipped")
        if skipped is not None and int(np.sum(skipped)):
            counters["skipped_records"] += int(np.sum(skipped))
        if examples is not None:
            examples.add(host)
        yield sharding.global_batch({k: host[k] for k in keys}, mesh)


class ExampleLog:
    """Appends, per training step, the source indices of the examples this process fed to it:
    DIR/examples/process_P.jsonl, one {"step", "index"} row per step, on disk as soon as written
    (so a killed run's log is complete). A resumed run appends the steps it redoes again;
    `read_examples` keeps the last row of each step."""

    def __init__(self, workdir: str, start_step: int):
        os.makedirs(os.path.join(workdir, "examples"), exist_ok=True)
        path = os.path.join(workdir, "examples", f"process_{jax.process_index()}.jsonl")
        self._file = open(path, "a", encoding="utf-8", buffering=1)
        self._step = int(start_step)

    def add(self, host_batch: Mapping[str, Any]) -> None:
        if "index" not in host_batch:
            raise KeyError("record_examples needs an `index` entry in the host batches (see data/pipeline.py)")
        self._step += 1
        index = [int(i) for i in np.asarray(host_batch["index"]).reshape(-1)]
        self._file.write(json.dumps({"step": self._step, "index": index}) + "\n")

    def close(self) -> None:
        self._file.close()


def read_examples(workdir: str) -> dict[int, dict[int, list[int]]]:
    """{process: {step: example indices}} from a run's example logs (the last row per step)."""
    out: dict[int, dict[int, list[int]]] = {}
    directory = os.path.join(workdir, "examples")
    for name in sorted(os.listdir(directory)):
        process = int(name.removeprefix("process_").removesuffix(".jsonl"))
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        out[process] = {r["step"]: r["index"] for r in rows}
    return out


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes config.json into the workdir (process 0), so a run documents how it was made."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(checkpoint_lib.config_to_json(config), f, indent=2, sort_keys=True)


def load_run_config(workdir: str, trainer: str | None = None) -> ml_collections.ConfigDict:
    """The config.json a run saved (see save_config); `trainer` checks which stage made it."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        kind = f"a {trainer} run directory" if trainer else "a run directory"
        raise FileNotFoundError(f"{path} not found: is {workdir!r} {kind} (launch/train.py --workdir=...)?")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if trainer is not None and config.get("trainer") != trainer:
        raise ValueError(f"{workdir!r} is a {config.get('trainer')!r} run, not a {trainer} run")
    return config


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, task: Task) -> dict[str, Any]:
    """Trains `task` as configured, writing checkpoints and metrics under `workdir`.

    Returns the last evaluation's scalars (empty when no evaluation ran) plus "step".
    """
    save_config(config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    tx = optim.make_optimizer(config.optim, int(config.total_steps))

    def ctor():
        model = task.make_model()
        extra = task.make_extra(model) if task.make_extra else None
        return TrainState(model, tx, extra)

    writer = metrics_lib.MetricWriter(workdir)
    ckpt = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=config.keep_checkpoints,
        save_interval_steps=config.checkpoint_every,
    )
    last_eval: dict[str, Any] = {}
    step = 0
    try:
        with jax.set_mesh(mesh), _StopRequest() as stop:
            step, last_eval = _run(config, task, ctor, mesh, ckpt, writer, stop)
    finally:
        # Also on an exception: wait for the async checkpoint in flight, flush the metrics.
        ckpt.close()
        writer.close()
    return {"step": step, **last_eval}


def _run(config, task: Task, ctor, mesh, ckpt, writer, stop: _StopRequest) -> tuple[int, dict[str, Any]]:
    total = int(config.total_steps)
    rng_root = jax.random.key(config.seed)
    ts = sharding.create_sharded(ctor, mesh)
    log.info("model: %s parameters; mesh %s", f"{optim.count_params(ts.model):,}", dict(mesh.shape))
    loader_iter = iter(task.train_data())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), nnx.state(ts))

    def fresh_state():
        if task.init_weights is not None:
            task.init_weights(ts)
        return nnx.state(ts)

    state, step, source = checkpoint_lib.restore_or_init(
        ckpt, abstract, fresh_state, init_from=config.init_from or None, data_iter=loader_iter,
        strict=config.get("init_strict", True)
    )
    nnx.update(ts, state)
    log.info("starting at step %d of %d (%s)", step, total, source)
    if step >= total:
        log.info("run already complete at step %d of %d; nothing to do", step, total)
        if jax.process_index() == 0:
            print(f"run already complete at step {step} of {total}; nothing to do", flush=True)
        return step, {}
    counters = {"skipped_records": 0}
    progress = metrics_lib.Progress(total, config.log_every, examples_per_step=task.examples_per_step,
                                    start_step=step, enabled=jax.process_index() == 0)
    examples = ExampleLog(writer.workdir, step) if config.get("record_examples", False) else None
    compiled, pending, state, last_eval = None, [], None, {}
    t_start = time.perf_counter()
    for batch in _host_batches(loader_iter, mesh, task.batch_keys, counters, examples):
        if task.prepare_batch is not None:
            batch = task.prepare_batch(batch)
        rng = jax.random.fold_in(rng_root, step)
        if compiled is None:
            _, compiled, memory = compile_train_step(task, ts, batch, rng)
            log.info("train step compiled in %.1fs; %s", time.perf_counter() - t_start, memory)
            state = nnx.state(ts)
        state, step_metrics = compiled(state, batch, rng)
        step += 1
        pending.append(step_metrics)
        is_last = step >= total
        want_ckpt = is_last or step % config.checkpoint_every == 0 or stop.signal is not None
        if step % config.log_every == 0 or want_ckpt:
            # Reading metrics syncs with the device; doing it every log_every steps keeps
            # dispatch asynchronous in between. No checkpoint is written before the losses
            # leading to it were checked, so a NaN never reaches a saved state.
            host = jax.device_get(pending)
            pending = []
            means = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
            metrics_lib.check_finite(step, means)
            means["lr"] = float(optim.lr_schedule(config.optim, total)(step))
            means["skipped_records"] = counters["skipped_records"]
            writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
            progress.update(step, {"loss": means["loss"]}, force=True)
        if want_ckpt:
            ckpt.save(step, state, data_iter=loader_iter, config=config, force=True)
        eval_due = config.eval_every and step % config.eval_every == 0
        if task.evaluate is not None and (eval_due or is_last):
            nnx.update(ts, state)
            last_eval = _run_eval(task, task.eval_model(ts) if task.eval_model else ts.model, step, writer)
        if is_last or stop.signal is not None:
            break
    if state is not None:
        nnx.update(ts, state)
    progress.close()
    if examples is not None:
        examples.close()
    if stop.signal is not None and step < total:
        log.warning("stopped by signal at step %d; rerun the same command to resume", step)
    return step, last_eval


def _run_eval(task: Task, model: nnx.Module, step: int, writer: metrics_lib.MetricWriter) -> dict[str, Any]:
    t0 = time.perf_counter()
    result = task.evaluate(model, step) or {}
    scalars = dict(result.get("scalars", {}))
    scalars["eval_seconds"] = time.perf_counter() - t0
    writer.write_scalars(step, {f"eval/{k}": v for k, v in scalars.items()})
    if result.get("texts"):
        writer.write_texts(step, {f"eval/{k}": v for k, v in result["texts"].items()})
    if result.get("images"):
        writer.write_images(step, {f"eval/{k}": v for k, v in result["images"].items()})
    writer.flush()
    shown = ", ".join(f"{k} {v:.4g}" for k, v in scalars.items() if isinstance(v, (int, float)))
    log.info("eval at step %d: %s", step, shown)
    return scalars
