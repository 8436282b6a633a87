"""Metric writing, console progress, a NaN/Inf guard and simple timers.

`MetricWriter` writes every metric twice: TensorBoard event files (tensorboardX; no TensorFlow)
for browsing, and `metrics.jsonl` (one JSON object per write) for the reports and plots that the
evals build, which should not need an event-file reader. Only process 0 writes: in a multi-host
job every process computes the same (globally reduced) metrics, and one copy is enough.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

import jax
import numpy as np

JSONL_NAME = "metrics.jsonl"


class NonFiniteError(FloatingPointError):
    """A metric went NaN or Inf; the message names the metrics and the step."""


def _to_float(value: Any) -> float:
    return float(np.asarray(value, dtype=np.float64).reshape(()))


def image_grid(images: np.ndarray, pad: int = 2, cols: int | None = None) -> np.ndarray:
    """[N,H,W,C] (or [H,W,C]) uint8 -> one [H', W', C] image, tiled in a near-square grid."""
    images = np.asarray(images)
    if images.ndim == 3:
        return images
    if images.ndim != 4:
        raise ValueError(f"Expected images of shape [H,W,C] or [N,H,W,C], got {images.shape}.")
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), images.dtype)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = img
    return grid


def _as_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.floating):  # accept [0, 1] floats too
        return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise ValueError(f"Images must be uint8 (or floats in [0, 1]); got {image.dtype}.")


class MetricWriter:
    """Writes scalars, images and texts to TensorBoard and `metrics.jsonl` under `workdir`.

    Example:
        writer = MetricWriter(workdir)
        writer.write_scalars(step, {"train/loss": loss, "train/lr": lr})
        writer.write_images(step, {"samples": images_uint8_nhwc})
        writer.close()
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None, flush_secs: int = 30):
        self.workdir = os.fspath(workdir)
        self.enabled = (jax.process_index() == 0) if enabled is None else bool(enabled)
        self._tb = None
        self._jsonl: TextIO | None = None
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter  # imported only where it writes

        os.makedirs(self.workdir, exist_ok=True)
        self._tb = SummaryWriter(logdir=self.workdir, flush_secs=flush_secs)
        # Append: a resumed run continues the same log (readers keep the last row per step).
        # Line-buffered: each row is on disk as soon as it is written, so a killed run keeps its log.
        self._jsonl = open(os.path.join(self.workdir, JSONL_NAME), "a", encoding="utf-8", buffering=1)

    def _log(self, step: int, kind: str, values: Mapping[str, Any]) -> None:
        row = {"step": int(step), "time": time.time(), "kind": kind, "values": dict(values)}
        # NaN/Inf are written as JSON's NaN/Infinity tokens (Python and pandas read them back).
        self._jsonl.write(json.dumps(row, sort_keys=False) + "\n")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.enabled or not scalars:
            return
        values = {k: _to_float(v) for k, v in scalars.items()}
        for name, value in values.items():
            self._tb.add_scalar(name, value, int(step))
        self._log(step, "scalars", values)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """name -> uint8 [H,W,3] image or [N,H,W,3] batch (tiled into a grid)."""
        if not self.enabled or not images:
            return
        shapes = {}
        for name, value in images.items():
            grid = image_grid(_as_uint8(value))
            self._tb.add_image(name, grid, int(step), dataformats="HWC")
            shapes[name] = list(np.shape(value))
        self._log(step, "images", shapes)  # the JSONL records what was written, not the pixels

    def write_texts(self, step: int, texts: Mapping[str, Any]) -> None:
        if not self.enabled or not texts:
            return
        values = {k: str(v) for k, v in texts.items()}
        for name, text in values.items():
            self._tb.add_text(name, text, int(step))
        self._log(step, "texts", values)

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled and self._tb is not None:
            self._tb.close()
            self._jsonl.close()
            self._tb, self._jsonl, self.enabled = None, None, False

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(workdir: str | os.PathLike, kind: str | None = "scalars") -> list[dict]:
    """Rows of `metrics.jsonl` (of one `kind`, or all with None), in write order."""
    path = os.path.join(os.fspath(workdir), JSONL_NAME)
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]


# ----------------------------------------------------------------------------------------------
# NaN / Inf guard
# ----------------------------------------------------------------------------------------------


def check_finite(step: int, metrics: Mapping[str, Any]) -> None:
    """Raises NonFiniteError naming every metric that holds a NaN or Inf at `step`.

    Fetches the values to host, so call it where the metrics are fetched anyway (log steps).
    """
    bad = []
    for name, value in metrics.items():
        arr = np.asarray(value)
        if not np.issubdtype(arr.dtype, np.inexact) or np.all(np.isfinite(arr)):
            continue
        kinds = [k for k, hit in (("NaN", np.isnan(arr).any()), ("Inf", np.isinf(arr).any())) if hit]
        bad.append(f"{name}={arr.item() if arr.size == 1 else '/'.join(kinds) + f' in {arr.shape}'}")
    if bad:
        raise NonFiniteError(f"Non-finite metric(s) at step {int(step)}: {', '.join(bad)}.")


# ----------------------------------------------------------------------------------------------
# Progress line and timers
# ----------------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Console progress: "step 200/1000 (20.0%) | 5.12 steps/s | 655 ex/s | loss 0.4211 | ETA 2m36s".

    Rates are measured over the steps since the previous report. On a TTY one line is redrawn in
    place (carriage return); in a log file (non-TTY) each report is its own line.
    """

    def __init__(
        self,
        total_steps: int,
        every: int = 100,
        *,
        examples_per_step: int | None = None,
        stream: TextIO | None = None,
        start_step: int = 0,
        clock=time.perf_counter,
        unit: str = "step",
        enabled: bool = True,
    ):
        self.enabled = bool(enabled)  # False: report nothing (e.g. on processes other than 0)
        self.total_steps = int(total_steps)
        self.unit = unit  # what a step counts ("image" for the recaptioner): "image 8/96 | 3.10 images/s"
        self.every = max(1, int(every))
        self.examples_per_step = examples_per_step
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._clock = clock
        self._last_step, self._last_time = int(start_step), clock()
        self._open_line = False

    def format(self, step: int, steps_per_s: float, loss: float | None) -> str:
        parts = [f"{self.unit} {step}/{self.total_steps} ({100.0 * step / max(1, self.total_steps):.1f}%)",
                 f"{steps_per_s:.2f} {self.unit}s/s"]
        if self.examples_per_step:
            parts.append(f"{steps_per_s * self.examples_per_step:.0f} ex/s")
        if loss is not None:
            parts.append(f"loss {loss:.4g}")
        eta = (self.total_steps - step) / steps_per_s if steps_per_s > 0 else float("inf")
        parts.append(f"ETA {_duration(eta)}")
        return " | ".join(parts)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None, *, force: bool = False) -> str | None:
        """Reports at every `every`-th step, the last step, or when forced; returns the line."""
        step = int(step)
        if not self.enabled or not (force or step % self.every == 0 or step >= self.total_steps):
            return None
        now = self._clock()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        loss = metrics.get("loss") if metrics else None
        line = self.format(step, rate, None if loss is None else _to_float(loss))
        if self.tty:
            self.stream.write("\r\033[K" + line)  # clear to end of line, then redraw
            self._open_line = step < self.total_steps
            if not self._open_line:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        return line

    def close(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


class Timers:
    """Accumulates wall time per name: `with timers("data"): batch = next(it)`."""

    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self._total: dict[str, float] = defaultdict(float)
        self._count: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = self._clock()
        try:
            yield
        finally:
            self._total[name] += self._clock() - start
            self._count[name] += 1

    def summary(self, reset: bool = True) -> dict[str, float]:
        """{"time/<name>_ms": mean milliseconds per call} since the last reset."""
        out = {f"time/{k}_ms": 1e3 * self._total[k] / self._count[k] for k in self._total if self._count[k]}
        if reset:
            self._total.clear()
            self._count.clear()
        return out


@contextlib.contextmanager
def timed(name: str, timers: Timers | None = None, *, log: TextIO | None = None) -> Iterator[None]:
    """Times a block into `timers`, or prints "<name>: 1.23s" to `log` (stderr) without one."""
    if timers is not None:
        with timers(name):
            yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        print(f"{name}: {time.perf_counter() - start:.2f}s", file=log or sys.stderr)
