"""Multi-process start-up: `jax.distributed` from the environment, before anything touches a device.

Every launch script calls `runtime.init()`, which calls `initialize()` here first. One process runs
per host (TPU VM worker) or per GPU (SLURM task); each sees the devices of the whole job through
`jax.devices()` and its own through `jax.local_devices()`. What decides the set-up, first match:

  1. explicit settings: `initialize(coordinator_address=..., num_processes=..., process_id=...)`
     (the `--coordinator_address/--num_processes/--process_id` flags of the absl launch scripts
     pass theirs here), else the environment variables
        DALLE3_JAX_COORDINATOR (or JAX_COORDINATOR_ADDRESS)  host:port of process 0
        DALLE3_JAX_NUM_PROCESSES                             processes in the job
        DALLE3_JAX_PROCESS_ID                                this process, 0 .. N-1
  2. DALLE3_JAX_DISTRIBUTED=on: `jax.distributed.initialize()` with JAX's own cluster detection
     (Cloud TPU VM pods, GKE TPU, SLURM, Open MPI); an undetected cluster is an error.
     DALLE3_JAX_DISTRIBUTED=off: always a single process.
  3. (auto, the default) a SLURM step with more than one task, or an Open MPI job with more than
     one rank: JAX's detection reads the coordinator, count and rank from their variables.
  4. (auto) a Cloud TPU VM (libtpu installed): JAX's detection asks the VM metadata for the pod's
     workers; where it finds none (e.g. a single-host notebook VM) the run is a single process.
  5. otherwise a single process, and nothing is initialised.

Data, logs and files follow the process index: the input pipeline gives each process its own
slice of every global batch (data/pipeline.py), only process 0 writes metrics, config and sample
images and logs below warnings, and Orbax checkpoints are written by all processes together.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os

import jax

log = logging.getLogger(__name__)

ENV_COORDINATOR = "DALLE3_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "DALLE3_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "DALLE3_JAX_PROCESS_ID"
ENV_MODE = "DALLE3_JAX_DISTRIBUTED"
MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class Setup:
    """How this process joined the job: `source` says which rule of the module docstring applied."""

    process_id: int
    num_processes: int
    coordinator_address: str | None
    source: str  # "explicit" | "cluster" | "single"


_SETUP: Setup | None = None


def _env_int(name: str) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer") from None


def _cluster_job() -> str | None:
    """The multi-process launcher this process runs under, from its variables (cheap, no I/O)."""
    if "SLURM_JOB_ID" in os.environ and (_env_int("SLURM_NTASKS") or 1) > 1:
        return "slurm"
    if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "ompi"
    return None


def _on_tpu_vm() -> bool:
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    return importlib.util.find_spec("libtpu") is not None and (not platforms or "tpu" in platforms)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    mode: str | None = None,
    initialization_timeout: int = 300,
) -> Setup:
    """Joins the multi-process job this process belongs to, if any; see the module docstring.

    Idempotent: a second call returns the first call's Setup. Must run before any JAX computation
    or device query (a process that already started its backend can only run alone).

    Raises:
      ValueError: for partial or inconsistent explicit settings (naming what is missing) or an
        unknown mode.
      RuntimeError: when a multi-process set-up is asked for after the backend started.
    """
    global _SETUP
    if _SETUP is not None:
        return _SETUP
    mode = (mode or os.environ.get(ENV_MODE, "") or "auto").lower()
    if mode not in MODES:
        raise ValueError(f"{ENV_MODE}={mode!r}; valid: {', '.join(MODES)}")
    if mode == "off":
        _SETUP = Setup(0, 1, None, "single")
        return _SETUP
    coordinator_address = (coordinator_address or os.environ.get(ENV_COORDINATOR)
                           or os.environ.get("JAX_COORDINATOR_ADDRESS") or None)
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)

    explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes,
                "process_id": process_id}
    given = {k for k, v in explicit.items() if v is not None}
    if given and given != set(explicit):
        missing = ", ".join(sorted(set(explicit) - given))
        raise ValueError(
            f"multi-process settings are incomplete: {', '.join(sorted(given))} given but {missing} missing "
            f"(flags --coordinator_address/--num_processes/--process_id or the variables {ENV_COORDINATOR}, "
            f"{ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
    elif given:
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id} is not in [0, num_processes={num_processes})")
        if num_processes > 1:
            _start(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
                   cluster_detection_method="deactivate", initialization_timeout=initialization_timeout)
        _SETUP = Setup(process_id, num_processes, coordinator_address, "explicit")
    elif mode == "on" or _cluster_job() is not None:
        _start(initialization_timeout=initialization_timeout)
        _SETUP = _joined("cluster")
    elif _on_tpu_vm():
        try:
            _start(initialization_timeout=initialization_timeout)
            _SETUP = _joined("cluster")
        except ValueError as e:  # JAX found no pod: "coordinator_address should be defined", ...
            log.info("distributed: no TPU pod detected (%s); running as a single process", e)
            _SETUP = Setup(0, 1, None, "single")
    else:
        _SETUP = Setup(0, 1, None, "single")
    return _SETUP


def describe(setup: Setup) -> str:
    return (f"distributed: process {setup.process_id} of {setup.num_processes} (coordinator "
            f"{setup.coordinator_address}, from {setup.source} settings)")


def _start(**kwargs) -> None:
    if jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise RuntimeError(
                "jax.distributed must start before anything uses a device: call runtime.init() (or "
                "distributed.initialize()) first thing in main, before jax.devices() or any computation"
            ) from e
        raise


def _joined(source: str) -> Setup:
    from jax._src import distributed as jax_distributed  # only to name the coordinator JAX settled on

    address = getattr(jax_distributed.global_state, "coordinator_address", None)
    return Setup(jax.process_index(), jax.process_count(), address, source)


def setup() -> Setup:
    """This process's Setup (initialising from the environment on first use)."""
    return _SETUP if _SETUP is not None else initialize()


def is_primary() -> bool:
    """True on the process that writes logs, metrics and other single-copy files (process 0)."""
    return jax.process_index() == 0


# ----------------------------------------------------------------------------------------------
# absl flags for the launch scripts


def define_flags() -> None:
    """Defines --coordinator_address, --num_processes and --process_id (absl); call at import
    time of a launch script, and pass `flag_values()` to runtime.init."""
    from absl import flags

    if "coordinator_address" in flags.FLAGS:
        return
    flags.DEFINE_string("coordinator_address", None, f"host:port of process 0 (else ${ENV_COORDINATOR}, or "
                        "detected on TPU pods, SLURM and Open MPI)")
    flags.DEFINE_integer("num_processes", None, f"processes in the job (else ${ENV_NUM_PROCESSES})")
    flags.DEFINE_integer("process_id", None, f"this process's index (else ${ENV_PROCESS_ID})")


def flag_values() -> dict:
    """The multi-process flags' values as `initialize` kwargs ({} where they are not defined)."""
    from absl import flags

    if "coordinator_address" not in flags.FLAGS or not flags.FLAGS.is_parsed():
        return {}
    f = flags.FLAGS
    return {"coordinator_address": f.coordinator_address, "num_processes": f.num_processes,
            "process_id": f.process_id}
