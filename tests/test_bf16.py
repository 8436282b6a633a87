"""bfloat16 compute with float32 master weights (`config.compute_dtype`), for the captioner (tiny
CoCa) and the T2I model (tiny): one training step in bfloat16 against the same step in float32
from the same initial weights and batch, and the dtypes that actually flow through the step.

Tolerances are measured, not guessed (XLA CPU, seed 0, the tiny configs, one batch of 16):

                 step-1 loss     step-2 loss (after one AdamW update, same batch and noise)
  captioner      rel 6.9e-4      rel 2.2e-4
  t2i            rel 0 (*)       rel 1.1e-4

(*) the UNet's last convolution starts at zero, so its first output, and the first loss, do not
depend on the compute dtype at all. The bounds below are 3x-5x these figures.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dalle3_jax import configlib, models, optim, trainers
from dalle3_jax.trainers import loop

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CASES = {"captioner": "captioner_pretrain.py:tiny", "t2i": "t2i.py:tiny"}
# (step-1 loss, step-2 loss) relative bounds per model; see the module docstring.
BOUNDS = {"captioner": (2e-3, 1e-3), "t2i": (1e-6, 5e-4)}
MATMULS = ("dot_general", "conv_general_dilated")


def _config(case: str, compute_dtype: str) -> ml_collections.ConfigDict:
    config = configlib.load_config_file(os.path.join(CONFIGS, CASES[case]))
    config.compute_dtype = compute_dtype
    config.optim.warmup_steps = 0  # a real update at step 1, so the step-2 loss differs
    return config


def _train_state(config, task) -> loop.TrainState:
    model = task.make_model()
    extra = task.make_extra(model) if task.make_extra else None
    return loop.TrainState(model, optim.make_optimizer(config.optim, config.total_steps), extra)


def _matmul_flops(jaxpr, acc: dict) -> None:
    """Adds the FLOPs of every dot_general / convolution in `jaxpr` (and its sub-jaxprs: jit,
    custom_jvp/vjp, remat, scan, cond) to acc[(primitive, lhs dtype, rhs dtype)]."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in MATMULS:
            lhs, rhs = (v.aval for v in eqn.invars[:2])
            out = eqn.outvars[0].aval
            if name == "dot_general":
                (contract, _), _ = eqn.params["dimension_numbers"]
                k = int(np.prod([lhs.shape[d] for d in contract]))
            else:  # each output element reads a whole kernel slice of one output feature
                out_feature = eqn.params["dimension_numbers"].rhs_spec[0]
                k = int(np.prod(rhs.shape)) // rhs.shape[out_feature]
            key = (name, str(lhs.dtype), str(rhs.dtype))
            acc[key] = acc.get(key, 0) + 2 * int(np.prod(out.shape)) * k
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _matmul_flops(inner, acc)


def _two_steps(task, graphdef, state, batch) -> tuple[list[float], object, dict]:
    """The loop's own train step, traced once (its jaxpr is inspected) and run twice on the same
    batch and key: (the two losses, the state after them, matmul FLOPs by operand dtypes)."""
    step = loop._default_step(task)

    def pure(state, batch, rng):
        ts = nnx.merge(graphdef, state)
        metrics = step(ts, batch, rng)
        return nnx.state(ts), metrics

    rng = jax.random.key(0)
    traced = jax.jit(pure).trace(state, batch, rng)
    flops: dict = {}
    _matmul_flops(traced.jaxpr.jaxpr, flops)
    compiled = traced.lower().compile()
    losses = []
    for _ in range(2):
        state, metrics = compiled(state, batch, rng)
        losses.append(float(metrics["loss"]))
    return losses, state, flops


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    """(case, {dtype: (losses, state after two steps, matmul FLOPs, task, initial state)}) for one
    model; both dtypes start from the same initial weights and read the same batch."""
    case = request.param
    workdir = str(tmp_path_factory.mktemp(case))
    out, start = {}, None
    for dtype in ("float32", "bfloat16"):
        config = _config(case, dtype)
        task = trainers.build_task(config, workdir)
        if start is None:  # one real batch of the task's own pipeline, and the initial weights
            host = next(iter(task.train_data()))
            batch = {k: jnp.asarray(host[k]) for k in task.batch_keys}
            if task.prepare_batch is not None:
                batch = task.prepare_batch(batch)
            _, start = nnx.split(_train_state(config, task))
        # This dtype's graph (the compute dtype is static: no weights are built for it), run
        # from the same initial weights (the step donates nothing, so `start` stays intact).
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _train_state(config, task)))
        shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
        assert shapes(abstract) == shapes(start)
        out[dtype] = (*_two_steps(task, graphdef, start, batch), task, graphdef, batch)
    return case, out


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def test_bf16_step_matches_float32(pair):
    case, out = pair
    l32, l16 = out["float32"][0], out["bfloat16"][0]
    b1, b2 = BOUNDS[case]
    assert np.isfinite(l16).all()
    assert _rel(l16[0], l32[0]) <= b1, (case, l16, l32)
    assert _rel(l16[1], l32[1]) <= b2, (case, l16, l32)
    assert l32[1] < l32[0] and l16[1] < l16[0]  # both updates learn


def _float_dtypes(tree) -> set:
    return {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def test_master_weights_grads_and_state_stay_float32(pair):
    case, out = pair
    _, state, _, task, graphdef, batch = out["bfloat16"]
    # Everything the step carries (params, AdamW moments, the T2I model's EMA weights) after it.
    assert _float_dtypes(state) == {jnp.dtype(jnp.float32)}, case
    ts = nnx.merge(graphdef, state)
    assert _float_dtypes(nnx.state(ts.opt, nnx.OptState)) == {jnp.dtype(jnp.float32)}, case
    if ts.extra is not None:
        assert _float_dtypes(nnx.state(ts.extra, nnx.Param)) == {jnp.dtype(jnp.float32)}, case
    # The gradients (shapes and dtypes only: nothing is compiled).
    model_graph, params = nnx.split(ts.model)

    def grads(params):
        return jax.grad(lambda p: task.loss_fn(nnx.merge(model_graph, p), batch, jax.random.key(0))[0])(params)

    assert _float_dtypes(jax.eval_shape(grads, params)) == {jnp.dtype(jnp.float32)}, case


def test_matmuls_and_convs_run_in_bf16(pair):
    """The traced train step (forward, backward and update): nearly all matmul and convolution
    FLOPs take bfloat16 operands under compute_dtype=bfloat16, none under float32."""
    case, out = pair
    acc = out["bfloat16"][2]
    total = sum(acc.values())
    bf16 = sum(v for (_, a, b), v in acc.items() if a == b == "bfloat16")
    assert any(p == "conv_general_dilated" for p, _, _ in acc), acc  # ViT stem / UNet convolutions
    # What stays float32 by design is small: the captioner's [B, B] contrastive similarities.
    assert bf16 / total >= 0.99, (case, {k: v / total for k, v in acc.items()})
    assert all(a == b == "float32" for _, a, b in out["float32"][2]), out["float32"][2]


def test_compute_dtype_sets_every_block_and_only_dtype():
    cfg = models.config("t2i", "tiny")
    out = models.with_compute_dtype(cfg, "bfloat16")
    assert out.text.dtype == out.unet.dtype == "bfloat16"
    assert cfg.text.dtype == "float32"  # a copy: the run's config is not edited
    coca_cfg = models.with_compute_dtype(models.config("coca", "tiny"), "bfloat16")
    assert coca_cfg.dtype == "bfloat16" and coca_cfg.param_dtype == "float32"
    assert models.with_compute_dtype(cfg, "") is cfg
    with pytest.raises(ValueError, match="compute_dtype='float16'; valid: float32, bfloat16"):
        models.with_compute_dtype(cfg, "float16")
