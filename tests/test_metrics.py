"""Metric files (JSONL + TensorBoard events), the NaN/Inf guard, progress lines and timers."""

import glob
import io
import json
import math
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from dalle3_jax import metrics


def read_events(workdir):
    """Parses TensorBoard event files by hand: records are [len u64][crc u32][data][crc u32]."""
    events = []
    for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos: pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12: pos + 12 + length]))
            pos += 12 + length + 4
    return events


def test_writer_jsonl_and_events(tmp_path):
    with metrics.MetricWriter(tmp_path) as writer:
        writer.write_scalars(1, {"train/loss": jnp.float32(0.5), "train/lr": 1e-3})
        writer.write_scalars(2, {"train/loss": np.float64(0.25)})
        writer.write_images(2, {"samples": np.full((3, 8, 8, 3), 200, np.uint8), "one": np.zeros((8, 8, 3), np.uint8)})
        writer.write_texts(2, {"captions": "three blue squares"})
        writer.flush()

    rows = metrics.read_jsonl(tmp_path, kind=None)
    assert [(r["step"], r["kind"]) for r in rows] == [(1, "scalars"), (2, "scalars"), (2, "images"), (2, "texts")]
    assert rows[0]["values"] == {"train/loss": 0.5, "train/lr": 1e-3}
    assert isinstance(rows[0]["time"], float) and rows[0]["time"] > 1.6e9
    assert rows[2]["values"] == {"samples": [3, 8, 8, 3], "one": [8, 8, 3]}
    assert rows[3]["values"] == {"captions": "three blue squares"}
    assert [r["values"]["train/loss"] for r in metrics.read_jsonl(tmp_path)] == [0.5, 0.25]
    for line in open(tmp_path / metrics.JSONL_NAME):
        json.loads(line)  # one object per line

    summaries = {}
    for event in read_events(tmp_path):
        for value in event.summary.value:
            summaries[(value.tag, event.step)] = value
    assert summaries[("train/loss", 1)].simple_value == pytest.approx(0.5)
    assert summaries[("train/loss", 2)].simple_value == pytest.approx(0.25)
    assert summaries[("train/lr", 1)].simple_value == pytest.approx(1e-3)
    image = summaries[("samples", 2)].image
    assert (image.height, image.width) == (2 + 2 * 10, 2 + 2 * 10)  # 3 images -> 2x2 grid, 2 px pad
    assert image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(tag.startswith("captions") for tag, _ in summaries)


def test_writer_appends_on_resume_and_disabled_writes_nothing(tmp_path):
    with metrics.MetricWriter(tmp_path / "run") as w:
        w.write_scalars(1, {"loss": 1.0})
    with metrics.MetricWriter(tmp_path / "run") as w:
        w.write_scalars(2, {"loss": 2.0})
    assert [r["step"] for r in metrics.read_jsonl(tmp_path / "run")] == [1, 2]

    with metrics.MetricWriter(tmp_path / "other", enabled=False) as w:  # e.g. process 1
        w.write_scalars(1, {"loss": 1.0})
        w.write_images(1, {"x": np.zeros((4, 4, 3), np.uint8)})
        w.flush()
    assert not os.path.exists(tmp_path / "other")


def test_image_grid():
    images = np.stack([np.full((2, 3, 3), i, np.uint8) for i in range(5)])
    grid = metrics.image_grid(images, pad=1)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 3)  # 5 -> 3 columns x 2 rows
    assert grid[1, 1, 0] == 0 and grid[1 + 3, 1 + 4, 0] == 4  # row 1, column 1 holds image 4
    assert metrics._as_uint8(np.array([[[0.0, 0.5, 1.0]]])).tolist() == [[[0, 128, 255]]]
    with pytest.raises(ValueError, match="uint8"):
        metrics._as_uint8(np.zeros((2, 2, 3), np.int32))


def test_check_finite():
    metrics.check_finite(3, {"loss": 0.1, "grad_norm": jnp.float32(2.0), "step": 3, "vec": np.ones(4)})
    with pytest.raises(metrics.NonFiniteError, match=r"at step 7: loss=nan"):
        metrics.check_finite(7, {"loss": float("nan"), "acc": 0.5})
    with pytest.raises(metrics.NonFiniteError, match=r"at step 9: grad_norm=inf, loss=-inf"):
        metrics.check_finite(9, {"grad_norm": jnp.inf, "loss": -np.inf, "ok": 1.0})
    with pytest.raises(metrics.NonFiniteError, match=r"per_layer=NaN/Inf in \(3,\)"):
        metrics.check_finite(1, {"per_layer": np.array([1.0, np.nan, np.inf])})


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class TTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_non_tty_lines():
    clock, out = FakeClock(), io.StringIO()
    progress = metrics.Progress(1000, every=100, examples_per_step=128, stream=out, clock=clock)
    clock.t = 20.0
    assert progress.update(50, {"loss": 1.0}) is None  # not a report step
    line = progress.update(100, {"loss": jnp.float32(0.4211)})
    assert line == "step 100/1000 (10.0%) | 5.00 steps/s | 640 ex/s | loss 0.4211 | ETA 3m00s"
    clock.t = 30.0
    progress.update(200)
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines == [line, "step 200/1000 (20.0%) | 10.00 steps/s | 1280 ex/s | ETA 1m20s"]


def test_progress_tty_redraws_one_line():
    clock, out = FakeClock(), TTY()
    progress = metrics.Progress(20, every=10, stream=out, clock=clock)
    clock.t = 2.0
    progress.update(10, {"loss": 3.0})
    assert out.getvalue() == "\r\x1b[Kstep 10/20 (50.0%) | 5.00 steps/s | loss 3 | ETA 2s"
    clock.t = 3.0
    progress.update(20)
    assert out.getvalue().endswith("\r\x1b[Kstep 20/20 (100.0%) | 10.00 steps/s | ETA 0s\n")
    assert out.getvalue().count("\n") == 1
    assert metrics._duration(3725) == "1h02m05s" and metrics._duration(math.inf) == "?"


def test_timers():
    clock = FakeClock()
    timers = metrics.Timers(clock=clock)
    for dt in (1.0, 3.0):
        with timers("data"):
            clock.t += dt
    assert timers.summary() == {"time/data_ms": 2000.0}
    assert timers.summary() == {}
    log = io.StringIO()
    with metrics.timed("compile", log=log):
        pass
    assert log.getvalue().startswith("compile: ") and log.getvalue().endswith("s\n")
    with metrics.timed("step", timers):
        clock.t += 0.5
    assert timers.summary() == {"time/step_ms": 500.0}
