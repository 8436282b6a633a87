"""Shared test setup: 8 virtual CPU devices, a persistent compilation cache, shared fixtures.

XLA reads its flags once, when the backend starts, so they are set here before anything
imports jax. Every test then sees 8 CPU devices; single-device tests build a one-device mesh.
"""

import os

# Backend optimisation level 0: test programs are tiny and compiled once each, so LLVM's
# optimisation passes cost far more than they save (a cold run of the T2I tests: 224 s -> 122 s).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Grain workers and tokenizers spawn threads of their own; keep 2 cores from oversubscribing.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

_CACHE_DIR = os.environ.get(
    "DALLE3_JAX_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dalle3_jax", "jax_test_cache")
)
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
# Cache every compilation: test programs are small, and recompiling them dominates test time.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# Grain's multiprocessing workers read absl flags; under pytest nobody parses them.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def n_devices():
    """The number of (virtual) devices tests run on."""
    return jax.device_count()


@pytest.fixture(scope="session")
def tiny_t2i_run(tmp_path_factory):
    """A tiny T2I run (configs/t2i.py:tiny) of 6 steps on all 8 devices (data=8), logging every
    step, with its end-of-run evaluation; checkpoints at 4 and 6 are kept. Shared by the T2I and
    the evaluation tests (copy it before writing into it). Returns (workdir, result)."""
    from dalle3_jax import configlib, trainers
    from dalle3_jax.trainers import loop

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workdir = str(tmp_path_factory.mktemp("t2i"))
    config = configlib.load_config_file(os.path.join(root, "configs", "t2i.py:tiny"))
    # Orbax writes each of the ~600 state arrays separately (seconds per save): save only the
    # step-4 checkpoint that the resume test restarts from, and the last one.
    config.total_steps, config.log_every, config.checkpoint_every = 6, 1, 4
    assert config.mesh.data == -1 and config.mesh.fsdp == 1  # 8 devices, data parallel
    result = loop.train_and_evaluate(config, workdir, trainers.build_task(config, workdir))
    return workdir, result


@pytest.fixture(scope="session")
def tiny_pipeline_run(tmp_path_factory):
    """The whole tiny recipe (`launch/pipeline.py --config=configs/pipeline.py:tiny --json`) run once
    in a subprocess: (workdir, its stdout). Shared by the pipeline and the notebook tests; later
    runs of the same command there skip every finished stage."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workdir = tmp_path_factory.mktemp("pipeline")
    env = dict(os.environ)
    # Children compile the same tiny programs as the tests: share the tests' compilation cache.
    env["DALLE3_JAX_CACHE"] = _CACHE_DIR
    # One CPU device: the pipeline's stages are plain single-host runs, and 8 virtual devices on 2
    # cores make each of its ~10 processes compile and run several times slower.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    cmd = [sys.executable, os.path.join(root, "launch", "pipeline.py"), "--config=configs/pipeline.py:tiny",
           f"--workdir={workdir}", "--json", "--quiet"]
    first = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    return workdir, first.stdout
