"""Runs pipeline stages as child processes: skip what is done, show progress, keep every log.

A stage is done when `<workdir>/stages/<name>.json` exists and records the same command: a
rerun of a killed or finished pipeline skips it. A stage whose command changed (say, more
training steps) runs again; its own run directory makes it resume rather than start over.

The child's output goes, line by line, to `<workdir>/logs/<name>.log` and to the console
(prefixed with the stage name). If the pipeline itself is stopped (Ctrl-C, SIGTERM), the child
gets SIGTERM, which makes trainers checkpoint before they exit; on Linux a child also gets
SIGTERM if the pipeline dies without warning (SIGKILL), so no stage keeps running orphaned.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from typing import TextIO

from dalle3_jax.recipe.stages import ROOT, Stage


class StageFailed(RuntimeError):
    """A stage's process exited with a non-zero status."""


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to send SIGTERM when the pipeline process dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux / no glibc: the child may outlive a killed pipeline
        pass


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Runner:
    """Runs stages in order under `workdir`, printing progress to `out`."""

    def __init__(self, workdir: str, *, out: TextIO = sys.stdout, quiet: bool = False):
        self.workdir = workdir
        self.out = out
        self.quiet = quiet  # print only the stage lines, not the children's output
        self.marker_dir = os.path.join(workdir, "stages")
        self.log_dir = os.path.join(workdir, "logs")
        os.makedirs(self.marker_dir, exist_ok=True)
        os.makedirs(self.log_dir, exist_ok=True)
        self.started = time.time()

    def _marker(self, stage: Stage) -> str:
        return os.path.join(self.marker_dir, f"{stage.name}.json")

    def record(self, stage: Stage) -> dict | None:
        """The finished-stage record of `stage` if it is done with the same command, else None."""
        path = self._marker(stage)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            rec = json.load(f)
        # The interpreter path may differ between machines or venvs; the arguments must not.
        return rec if rec.get("argv", [None])[1:] == stage.argv[1:] else None

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def banner(self, stages: list[Stage]) -> None:
        """The stage table: what will run and what is already done."""
        self._print(f"pipeline: {len(stages)} stages under {self.workdir}")
        for i, s in enumerate(stages, 1):
            rec = self.record(s)
            state = f"done ({format_seconds(rec['wall_s'])})" if rec else "to run"
            self._print(f"  {i:2d}. {s.name:14s} {state:16s} {s.title}")

    def run(self, stages: list[Stage], index: int, stage: Stage) -> dict:
        """Runs one stage unless it is done; returns its record (argv, wall_s, skipped)."""
        done = self.record(stage)
        bar = _bar(index - 1, len(stages))
        elapsed = format_seconds(time.time() - self.started)
        if done:
            self._print(f"[{bar}] {index}/{len(stages)} {stage.name}: done earlier in "
                        f"{format_seconds(done['wall_s'])}, skipped | pipeline {elapsed}")
            return dict(done, skipped=True)
        self._print(f"[{bar}] {index}/{len(stages)} {stage.name}: {stage.title} | pipeline {elapsed}")
        log_path = os.path.join(self.log_dir, f"{stage.name}.log")
        t0 = time.time()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log_path, "a", encoding="utf-8", buffering=1) as log:  # line-buffered: tail -f works
            log.write(f"\n$ {' '.join(stage.argv)}\n")
            log.flush()
            proc = subprocess.Popen(stage.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1, preexec_fn=_die_with_parent if os.name == "posix" else None)
            try:
                for line in proc.stdout:
                    log.write(line)
                    if not self.quiet and _worth_showing(line):
                        self._print(f"  {stage.name} | {line.rstrip()}")
                rc = proc.wait()
            except BaseException:  # Ctrl-C or SIGTERM: let the stage checkpoint, then stop
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=120)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                self._print(f"pipeline stopped during {stage.name}; rerun the same command to resume")
                raise
        wall = time.time() - t0
        if rc != 0:
            tail = _tail(log_path, 25)
            raise StageFailed(f"stage {stage.name} failed (exit status {rc}) after {format_seconds(wall)}; "
                              f"its log is {log_path}; last lines:\n{tail}")
        rec = {"argv": stage.argv, "wall_s": wall, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = self._marker(stage) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rec, f, indent=1)
        os.replace(tmp, self._marker(stage))  # the stage counts as done only once this lands
        self._print(f"  {stage.name}: finished in {format_seconds(wall)}")
        return dict(rec, skipped=False)


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = int(width * done / max(total, 1))
    return "#" * filled + "-" * (width - filled)


# Children print a lot at start-up (library banners, compile notes); the console shows progress
# lines, warnings, errors and results; the full output is always in the stage's log.
_NOISE = ("PyTorch was not found", "TensorFlow", "absl::InitializeLog", "WARNING: All log messages",
          "oneDNN", "cuda", "CUDA", "Unable to initialize backend", "Platform 'METAL'")


def _worth_showing(line: str) -> bool:
    line = line.strip()
    return bool(line) and not any(n in line for n in _NOISE)


def _tail(path: str, n: int) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-n:])
