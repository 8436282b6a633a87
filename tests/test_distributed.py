"""Running at scale: a 2-process job on loopback matches one process, and trainers killed with
SIGKILL at a random step resume exactly with the same command.

The subprocesses share the tests' compilation cache and XLA flags, so after the first suite run
they load compiled programs instead of compiling them.
"""

import concurrent.futures
import json
import os
import random
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from dalle3_jax import distributed, metrics, trainers
from dalle3_jax.data import pipeline, sources
from dalle3_jax.data.world import WorldConfig, WorldSource
from dalle3_jax.trainers import loop

import multiprocess_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("DALLE3_JAX_TEST_CACHE",
                       os.path.join(os.path.expanduser("~"), ".cache", "dalle3_jax", "jax_test_cache"))
STEPS = 6


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DALLE3_JAX_")}
    env.update(DALLE3_JAX_CACHE=CACHE, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0")
    env.update(extra)
    return env


def _rows(workdir, key="train/loss"):
    """[(step, value)] of every row that holds `key`, in write order (a resumed run's redone
    steps appear twice)."""
    return [(r["step"], r["values"][key]) for r in metrics.read_jsonl(workdir) if key in r["values"]]


def _last_eval(workdir):
    evals = [r["values"] for r in metrics.read_jsonl(workdir) if "eval/eval_seconds" in r["values"]]
    return {k: v for k, v in evals[-1].items() if k != "eval/eval_seconds"}


def _expected_examples(config, steps=STEPS):
    """Source indices of each step's global batch in an uninterrupted single-process run."""
    loader = iter(pipeline.make_loader_from_config(sources.make_source(config.data), config.input,
                                                   process_index=0, process_count=1))
    return {s: [int(i) for i in next(loader)["index"]] for s in range(1, steps + 1)}


@pytest.fixture(scope="module")
def captioner_reference(tmp_path_factory):
    """worker.config_for("captioner") trained in this process on its 8 devices: (workdir, config)."""
    config = worker.config_for("captioner")
    workdir = str(tmp_path_factory.mktemp("captioner_reference"))
    loop.train_and_evaluate(config, workdir, trainers.build_task(config, workdir))
    return workdir, config


@pytest.fixture(scope="module")
def references(captioner_reference, tiny_t2i_run):
    """Per trainer: (workdir, config) of an uninterrupted single-process run of STEPS steps with a
    loss row per step and its end-of-run evaluation (T2I: conftest's tiny_t2i_run)."""
    t2i_config = worker.config_for("t2i")
    return {"captioner": captioner_reference, "t2i": (tiny_t2i_run[0], t2i_config)}


# ------------------------------------------------------------------------------------------ units


def test_global_batches_do_not_depend_on_the_process_count():
    source = WorldSource("train", WorldConfig(image_size=32))

    def batches(index, count, n=3):
        it = iter(pipeline.make_loader(source, global_batch_size=8, image_size=32, max_text_len=16,
                                       process_index=index, process_count=count, read_threads=1))
        return [next(it)["index"].tolist() for _ in range(n)]

    whole = batches(0, 1)
    halves = [batches(p, 2) for p in range(2)]
    for k in range(3):
        assert halves[0][k] + halves[1][k] == whole[k]  # process p holds rows [4p, 4p + 4)
        assert not set(halves[0][k]) & set(halves[1][k])
    # A finite epoch: whole global batches, then the last partial one split evenly.
    small = [{"image": np.zeros((8, 8, 3), np.uint8), "captions": {"alt": "x"}, "id": str(i)} for i in range(21)]
    parts = [list(pipeline.make_loader(small, global_batch_size=8, image_size=8, process_index=p, process_count=2,
                                       num_epochs=1, drop_remainder=False, shuffle=False, read_threads=1))
             for p in range(2)]
    got = [[b["index"].tolist() for b in part] for part in parts]
    assert got == [[[0, 1, 2, 3], [8, 9, 10, 11], [16, 17]], [[4, 5, 6, 7], [12, 13, 14, 15], [18, 19]]]


def test_initialize_settings(monkeypatch, n_devices):
    # (n_devices: this process's backend is up, as in a library user's process.)
    for name in list(os.environ):
        if name.startswith(("DALLE3_JAX_COORDINATOR", "DALLE3_JAX_NUM", "DALLE3_JAX_PROCESS", "DALLE3_JAX_DIST",
                            "SLURM_", "OMPI_")) or name == "JAX_COORDINATOR_ADDRESS":
            monkeypatch.delenv(name)

    def fresh(**kwargs):
        monkeypatch.setattr(distributed, "_SETUP", None)
        return distributed.initialize(**kwargs)

    assert fresh() == distributed.Setup(0, 1, None, "single")
    assert distributed.initialize(mode="on") is distributed.setup()  # idempotent: the first answer stays
    with pytest.raises(ValueError, match="num_processes, process_id missing"):
        fresh(coordinator_address="localhost:1234")
    monkeypatch.setenv("DALLE3_JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("DALLE3_JAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"process_id=2 is not in \[0, num_processes=2\)"):
        fresh(coordinator_address="localhost:1234")
    monkeypatch.setenv("DALLE3_JAX_PROCESS_ID", "one")
    with pytest.raises(ValueError, match="variable DALLE3_JAX_PROCESS_ID='one' is not an integer"):
        fresh(coordinator_address="localhost:1234")
    assert fresh(mode="off") == distributed.Setup(0, 1, None, "single")
    with pytest.raises(ValueError, match="DALLE3_JAX_DISTRIBUTED='sometimes'"):
        fresh(mode="sometimes")
    # A SLURM step of 2 tasks asks for jax.distributed, too late for this process.
    monkeypatch.delenv("DALLE3_JAX_NUM_PROCESSES")
    monkeypatch.delenv("DALLE3_JAX_PROCESS_ID")
    for name, value in dict(SLURM_JOB_ID="7", SLURM_NTASKS="2", SLURM_PROCID="0", SLURM_LOCALID="0",
                            SLURM_STEP_NODELIST="node1").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match="must start before anything uses a device"):
        fresh()
    monkeypatch.setattr(distributed, "_SETUP", None)


# ------------------------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(900)
def test_two_processes_match_one(tmp_path, references):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "multiprocess_worker.py"), str(tmp_path)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_env(4, DALLE3_JAX_COORDINATOR=f"localhost:{port}", DALLE3_JAX_NUM_PROCESSES="2",
                                       DALLE3_JAX_PROCESS_ID=str(p)))
             for p in range(2)]
    outputs = [proc.communicate(timeout=800)[0] for proc in procs]
    for p, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"process {p}:\n{out[-5000:]}"
    assert "distributed: process 0 of 2" in outputs[0]
    for name, (reference, config) in references.items():
        workdir = str(tmp_path / name)
        # The same global batches on 4 + 4 devices in two processes as on 8 in one: the same
        # losses, up to the order of float32 sums (cross-process all-reduces; for T2I also FSDP
        # across the processes against the one-process data-parallel reference).
        steps, losses = zip(*_rows(workdir))
        ref_steps, ref_losses = zip(*_rows(reference))
        assert steps == ref_steps == tuple(range(1, STEPS + 1)), name
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-6 if name == "captioner" else 0,
                                   atol=0 if name == "captioner" else 1e-5, err_msg=name)
        if name == "captioner":
            got_eval, want_eval = _last_eval(workdir), _last_eval(reference)
            assert got_eval.keys() == want_eval.keys()
            for key, value in want_eval.items():
                assert got_eval[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        # Each process read its own half of every global batch, and nothing else.
        seen = loop.read_examples(workdir)
        expected = _expected_examples(config)
        assert sorted(seen) == [0, 1]
        for step in range(1, STEPS + 1):
            assert not set(seen[0][step]) & set(seen[1][step])
            assert seen[0][step] + seen[1][step] == expected[step], (name, step)
    # Process 0 alone logs and reports progress (and the compiled step's memory at start).
    assert re.search(r"train step compiled .*per device: arguments", outputs[0])
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in outputs[0]  # the T2I run's FSDP mesh
    assert "step 6/6" in outputs[0]
    assert "train step compiled" not in outputs[1] and "step 6/6" not in outputs[1]


# ----------------------------------------------------------------------------------- SIGKILL


def _train_cmd(name, workdir):
    spec = worker.CONFIGS[name]
    cmd = [sys.executable, os.path.join(ROOT, "launch", "train.py"), f"--config={os.path.join(ROOT, 'configs', spec)}",
           f"--workdir={workdir}", f"--config.total_steps={STEPS}", "--config.log_every=1",
           "--config.checkpoint_every=2", "--config.record_examples=True"]
    # T2I: the final evaluation without prompt following (its sampling is the slow part).
    return cmd + (["--config.eval.n_prompts=0"] if name == "t2i" else [])


def _committed(workdir):
    directory = os.path.join(workdir, "checkpoints")
    return [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []


def _kill_at(cmd, workdir, step, timeout=600):
    """Runs `cmd` and SIGKILLs it once it has logged `step` (and committed a checkpoint)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(8), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    metrics_path = os.path.join(workdir, metrics.JSONL_NAME)
    while proc.poll() is None and time.monotonic() < deadline:
        if os.path.exists(metrics_path) and _committed(workdir):
            logged = [s for s, _ in _rows(workdir)]
            if logged and max(logged) >= step:
                proc.kill()
                break
        time.sleep(0.02)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == -9, f"to be killed after step {step}, it exited {proc.returncode}:\n{out[-4000:]}"
    return out


def _kill_then_rerun(name, workdir):
    """Kills `name`'s training command at a random step after its first checkpoint, then reruns
    it: (the step it was killed after, the step the rerun started from, rows logged before the kill)."""
    kill_step = random.Random().choice([3, 4, 5])
    cmd = _train_cmd(name, workdir)
    _kill_at(cmd, workdir, kill_step)
    killed_rows = _rows(workdir)
    rerun = subprocess.run(cmd, cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    start = int(re.search(r"starting at step (\d+) of 6 \((\w+)\)", rerun.stderr).group(1))
    return kill_step, start, killed_rows


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory, references):
    """Both trainers killed and rerun, side by side: each run is one mostly single-threaded
    process, so the two chains share the 2 CPU cores: {name: (workdir, kill step, start, rows)}."""
    root = tmp_path_factory.mktemp("killed")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(_kill_then_rerun, name, str(root / name)) for name in ("captioner", "t2i")}
        return {name: (str(root / name), *f.result()) for name, f in futures.items()}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["captioner", "t2i"])
def test_sigkill_at_a_random_step_then_rerun_is_exact(references, killed_runs, name):
    reference, config = references[name]
    workdir, kill_step, start, killed_rows = killed_runs[name]
    assert 2 <= start <= max(s for s, _ in killed_rows), (kill_step, start)
    # Every loss row, before the kill and after the restart (redone steps twice), equals the
    # uninterrupted run's at that step, bit for bit; so does the final evaluation.
    want = dict(_rows(reference))
    rows = _rows(workdir)
    assert sorted({s for s, _ in rows}) == list(range(1, STEPS + 1))
    for step, value in rows:
        assert value == want[step], (f"kill after step {kill_step}, resumed at {start}", step, value, want[step])
    final_eval, want_eval = _last_eval(workdir), _last_eval(reference)
    assert "eval/val_loss" in final_eval and final_eval == {k: want_eval[k] for k in final_eval}
    # The examples of every step, however often it ran, are the uninterrupted run's: none
    # repeated, none skipped.
    expected = _expected_examples(config)
    with open(os.path.join(workdir, "examples", "process_0.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert {r["step"] for r in logged} == set(expected)
    for r in logged:
        assert r["index"] == expected[r["step"]], (kill_step, start, r["step"])
    flat = [i for s in sorted(expected) for i in expected[s]]
    assert len(flat) == len(set(flat))
