"""Process start-up shared by every launch script: multi-process set-up (distributed.py),
compilation cache, logging, absl flags.

Call `init()` first thing in a `main`. It is idempotent and cheap.
"""

from __future__ import annotations

import logging
import os

import jax
from absl import flags
from absl import logging as absl_logging

from dalle3_jax import distributed

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "dalle3_jax", "jax_cache")


class _ReadOnlyRestoreFilter(logging.Filter):
    """Drops Orbax's warning that a checkpoint directory is read only: loading weights for
    evaluation or recaptioning opens it read only on purpose, so the warning is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Given directory is read only" not in record.getMessage()


def init(*, compilation_cache: str | None = None, log_level: int = logging.INFO,
         distributed_args: dict | None = None) -> None:
    """Joins a multi-process job if there is one, then sets up JAX's persistent compilation cache
    and Python logging for a launch script.

    Args:
      compilation_cache: directory of the persistent XLA cache; None uses $DALLE3_JAX_CACHE or
        ~/.cache/dalle3_jax/jax_cache; "" disables it. Reusing compiled programs saves most of
        the start-up time of small runs and of resumed runs.
      log_level: Python logging level for the library's messages (processes other than 0 log
        warnings and errors only).
      distributed_args: explicit `distributed.initialize` settings (e.g. from the launch
        script's flags, `distributed.flag_values()`); None reads the environment only.
    """
    # First: jax.distributed must start before anything touches a device.
    setup = distributed.initialize(**(distributed_args or {}))
    if setup.process_id != 0:
        log_level = max(log_level, logging.WARNING)
    cache = os.environ.get("DALLE3_JAX_CACHE", DEFAULT_CACHE_DIR) if compilation_cache is None else compilation_cache
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    # Orbax and Grain log every file operation through absl at INFO; keep those to warnings and
    # give the library's own loggers a handler of their own at `log_level`.
    absl_logging.set_verbosity(absl_logging.WARNING)
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _ReadOnlyRestoreFilter) for f in absl_logger.filters):
        absl_logger.addFilter(_ReadOnlyRestoreFilter())
    ours = logging.getLogger("dalle3_jax")
    if not any(getattr(h, "_dalle3_jax", False) for h in ours.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S"))
        handler._dalle3_jax = True
        ours.addHandler(handler)
    ours.setLevel(log_level)
    ours.propagate = False
    if setup.num_processes > 1:
        ours.info(distributed.describe(setup))
    # Grain's worker processes read absl flags; scripts run without absl.app never parse them.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
