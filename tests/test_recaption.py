"""The recaption job (launch/recaption.py): exactly once under kill -9, the same output on 1 and
8 devices, every odd input accounted for, reruns that do nothing, and output the pipeline reads."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
from PIL import Image

from dalle3_jax import configlib, trainers
from dalle3_jax.data import pipeline, records, sources
from dalle3_jax.recaption import job, writer
from dalle3_jax.trainers import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, PER_SHARD, BATCH = 96, 16, 8  # 6 shards of 2 batches each


def _config_file(name, variant):
    return configlib.load_config_file(os.path.join(ROOT, "configs", f"{name}.py:{variant}"))


@pytest.fixture(scope="module")
def captioner_runs(tmp_path_factory):
    """Tiny SSC and DSC captioners, trained for 2 steps from scratch."""
    runs = {}
    for name, config_name in (("ssc", "captioner_short"), ("dsc", "captioner_descriptive")):
        workdir = str(tmp_path_factory.mktemp(name))
        config = _config_file(config_name, "tiny,init_from=none,steps=2")
        config.eval.n_examples = 8  # the end-of-run eval is not what these tests are about
        loop.train_and_evaluate(config, workdir, trainers.build_task(config, workdir))
        runs[name] = workdir
    return runs


def _variant(runs, out):
    return f"ssc={runs['ssc']},dsc={runs['dsc']},n={N},out={out}"


def _job_config(runs, out, **overrides):
    config = _config_file("recaption", _variant(runs, out))
    config.records_per_shard, config.batch_size, config.read_threads = PER_SHARD, BATCH, 2
    for key, value in overrides.items():
        node, *path = key.split(".")
        target = config[node] if path else config
        target[path[0] if path else node] = value
    return config


def _raw_records(out) -> list[bytes]:
    src = sources.ArrayRecordSource(str(out))
    return [src.read_raw(i) for i in range(len(src))]


def _ids(raws):
    return [msgpack.unpackb(r)["id"] for r in raws]


@pytest.fixture(scope="module")
def reference(captioner_runs, tmp_path_factory):
    """An uninterrupted run on 8 devices over the first N world train images."""
    out = tmp_path_factory.mktemp("reference")
    summary = job.run(_job_config(captioner_runs, out), stream=io.StringIO())
    return out, summary


def test_uninterrupted_run_accounts_for_every_input(reference):
    out, summary = reference
    assert summary["complete"] and summary["inputs"] == N and summary["done"] == N and summary["failed"] == 0
    assert summary["shards"] == summary["shards_written_this_run"] == N // PER_SHARD and summary["skipped"] == 0
    assert set(summary["time_shares"]) == {"image", "decode", "write", "other"}
    raws = _raw_records(out)
    assert _ids(raws) == [f"train/{i:09d}" for i in range(N)]
    manifest = json.loads((out / writer.MANIFEST_FILE).read_text())
    assert [s["written"] for s in manifest["shards"]] == [PER_SHARD] * (N // PER_SHARD)
    assert manifest["job"]["captioners"]["dsc"]["step"] == 2
    assert (out / writer.FAILURES_FILE).read_text() == ""
    rec = records.decode_record(raws[5])
    world = sources.make_source(sources.default_data_config())[5]
    # The input record is kept whole, with the new captions and their provenance added.
    assert {k: rec["captions"][k] for k in world["captions"]} == world["captions"] and rec["scene"] == world["scene"]
    assert np.array_equal(records.decode_image(rec["image"]), world["image"])
    assert set(rec["captions"]) == set(world["captions"]) | {"ssc", "dsc"}
    prov = rec["meta"]["recaption"]["dsc"]
    assert prov["step"] == 2 and prov["checkpoint"].endswith(os.path.join("checkpoints", "2"))
    assert prov["decode"].startswith("greedy")


def test_kill_9_then_rerun_matches_uninterrupted(captioner_runs, reference, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, os.path.join(ROOT, "launch", "recaption.py"),
           f"--config={os.path.join(ROOT, 'configs', 'recaption.py')}:{_variant(captioner_runs, out)}",
           f"--config.records_per_shard={PER_SHARD}", f"--config.batch_size={BATCH}", "--config.read_threads=2",
           "--config.throttle_s=0.5"]  # slow enough that the kill lands mid-shard
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Kill once shard 0 is committed and shard 1 is half written (its temp file exists).
        deadline = time.monotonic() + 120
        while not ((out / "shards" / "00000.json").exists() and list(out.glob("recaptioned-00001-*.tmp-*"))):
            assert proc.poll() is None, f"the job ended before the kill:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "shard 1 was not started within 120 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    committed = sum(1 for p in (out / "shards").iterdir() if p.suffix == ".json")
    assert 1 <= committed < N // PER_SHARD and not (out / writer.SUMMARY_FILE).exists()

    # A kill between a shard's rename and its commit record leaves a data file without one.
    orphan = out / f"recaptioned-{N // PER_SHARD - 1:05d}-of-{N // PER_SHARD:05d}.array_record"
    orphan.write_bytes(b"a data file whose commit record was never written")
    log = io.StringIO()
    summary = job.run(_job_config(captioner_runs, out), stream=log)  # the rerun resumes
    assert f"removed {orphan.name}" in log.getvalue()
    if committed == 1:  # the usual case; a starved test process may see the kill land later
        assert "removed recaptioned-00001" in log.getvalue()  # the half-written shard's temp file
    assert summary["complete"] and summary["done"] + summary["failed"] == N
    assert summary["skipped"] == committed * PER_SHARD
    assert summary["shards_written_this_run"] == N // PER_SHARD - committed
    assert not [p for p in os.listdir(out) if ".tmp-" in p]
    # Every id exactly once, in order, byte for byte what the uninterrupted run wrote.
    assert _raw_records(out) == _raw_records(reference[0])


def test_one_device_matches_eight(captioner_runs, reference, tmp_path):
    config = _job_config(captioner_runs, tmp_path / "one", **{"mesh.num_devices": 1})
    log = io.StringIO()
    summary = job.run(config, stream=log)
    assert "'data': 1" in log.getvalue() and summary["done"] == N
    assert f"image {N}/{N} (100.0%)" in log.getvalue() and "images/s" in log.getvalue() and "ETA" in log.getvalue()
    assert _raw_records(tmp_path / "one") == _raw_records(reference[0])


def test_rerun_of_finished_job_does_nothing(captioner_runs, reference):
    out, _ = reference
    before = {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in os.listdir(out)}
    log = io.StringIO()
    summary = job.run(_job_config(captioner_runs, out), stream=log)
    assert summary["nothing_to_do"] and summary["skipped"] == N and summary["shards_written_this_run"] == 0
    assert "nothing to do" in log.getvalue() and "loaded" not in log.getvalue()  # not even the weights
    assert {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in os.listdir(out)} == before
    # The same directory with other settings is refused rather than mixed.
    with pytest.raises(writer.JobMismatch, match="records_per_shard"):
        job.run(_job_config(captioner_runs, out, records_per_shard=32), stream=io.StringIO())


def test_output_feeds_the_pipeline_with_dsc_captions(reference):
    out, _ = reference
    data = sources.default_data_config()
    data.source, data.arrayrecord_pattern = "arrayrecord", str(out)
    source = sources.make_source(data)
    loader = pipeline.make_loader(source, global_batch_size=16, image_size=64, caption_field="dsc", max_text_len=24,
                                  shuffle=False, num_epochs=1, keep_text=True)
    batches = list(loader)
    assert sum(len(b["id"]) for b in batches) == N
    want = {r["id"]: r["captions"]["dsc"] for r in (source[i] for i in range(len(source)))}
    assert all(c == want[i] for b in batches for i, c in zip(b["id"], b["caption"]))
    assert batches[0]["image"].shape == (16, 64, 64, 3) and batches[0]["tokens"].shape == (16, 24)


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_corrupt_and_odd_records_are_all_accounted_for(captioner_runs, tmp_path):
    world = sources.make_source(sources.default_data_config())
    good = [dict(world[i], image=_png(world[i]["image"])) for i in range(6)]
    png = good[0]["image"]
    raw = lambda rec: msgpack.packb({"v": records.SCHEMA_VERSION, **rec})  # noqa: E731  (bypasses validation)
    odd = {  # id -> (stored bytes, expected failure reason or None if it must be captioned)
        "corrupt": (raw({"id": "corrupt", "image": b"not an image", "captions": {"alt": "x"}}), "corrupt_image"),
        "truncated": (raw({"id": "truncated", "image": png[: len(png) // 2], "captions": {"alt": "x"}}),
                      "truncated_image"),
        "no_image": (raw({"id": "no_image", "captions": {"alt": "x"}}), "bad_record"),
        "no_captions": (raw({"id": "no_captions", "image": png, "captions": {}}), "bad_record"),
        "old_schema": (msgpack.packb({"v": 0, "id": "old_schema", "image": png, "captions": {"alt": "x"}}),
                       "bad_record"),
        "index:11": (b"\x00garbage, not msgpack", "bad_record"),
        "empty_caption": (raw({"id": "empty_caption", "image": png, "captions": {"alt": ""}}), None),
        "grey": (raw({"id": "grey", "image": _png(np.full((40, 30), 90, np.uint8)), "captions": {"alt": "g"}}),
                 None),
        "rgba": (raw({"id": "rgba", "image": _png(np.zeros((64, 64, 4), np.uint8)), "captions": {"alt": "a"}}),
                 None),
        "one_pixel": (raw({"id": "one_pixel", "image": _png(np.zeros((1, 1, 3), np.uint8)),
                           "captions": {"alt": "p"}}), None),
    }
    path = tmp_path / "input" / "odd.array_record"
    with sources.ArrayRecordShardWriter(path) as w:
        for rec in good:
            w.write(rec)
        for data, _ in odd.values():
            w.write_raw(data)
    n = len(good) + len(odd)
    out = tmp_path / "out"
    config = _job_config(captioner_runs, out, limit=0, records_per_shard=8)
    config.data.source, config.data.arrayrecord_pattern = "arrayrecord", str(path)
    summary = job.run(config, stream=io.StringIO())
    assert summary["inputs"] == n and summary["done"] + summary["failed"] == n
    failures = [json.loads(line) for line in (out / writer.FAILURES_FILE).read_text().splitlines()]
    assert {f["id"]: f["reason"] for f in failures} == {k: v for k, (_, v) in odd.items() if v}
    assert all(f["detail"] for f in failures) and summary["failed"] == len(failures)
    written = {r["id"]: r for r in map(records.decode_record, _raw_records(out))}
    assert set(written) == {r["id"] for r in good} | {k for k, (_, v) in odd.items() if v is None}
    assert all({"ssc", "dsc"} <= set(r["captions"]) for r in written.values())
    assert written["empty_caption"]["captions"]["alt"] == ""  # the input record is kept as it was


def test_clear_errors_for_missing_captioners_and_bad_config(captioner_runs, tmp_path):
    config = _job_config(captioner_runs, tmp_path / "out")
    config.captioners.ssc.workdir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        job.run(config, stream=io.StringIO())
    config = _job_config(captioner_runs, tmp_path / "out")
    config.captioners.dsc.step = 7
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 7"):
        job.run(config, stream=io.StringIO())
    config = _job_config(captioner_runs, tmp_path / "out", **{"decode.max_len": 500})
    with pytest.raises(ValueError, match="max_text_len"):
        job.run(config, stream=io.StringIO())
    with pytest.raises(ValueError, match="no captioner"):
        job.run(_config_file("recaption", "ssc=none,dsc=none"), stream=io.StringIO())
