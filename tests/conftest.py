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
