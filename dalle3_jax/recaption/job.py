"""Stage 3 of the recipe: recaption a dataset with the SSC and DSC captioners, sharded,
resumable and exactly once.

    python launch/recaption.py --config=configs/recaption.py [--config.output_dir=DIR]

The input (any data source: the synthetic world, ArrayRecord shards, TFDS; optionally the
range [start, start + limit)) is cut into fixed ranges of `records_per_shard` inputs; range k
becomes output shard k (see writer.py for the directory layout and how a shard is committed).
Process p of P handles shards p, p + P, ...; each process decodes on a mesh of its own devices
(data parallel over the mesh's data axes), so processes never wait for each other until the
end, where process 0 writes the manifest, failures.jsonl and summary.json.

Every output record is its input record with the new captions added to `captions` ("ssc",
"dsc") and `meta.recaption` naming each captioner's checkpoint, step and decode settings.
Every input is accounted for: it is in the output, or in failures.jsonl with its id and why
(unreadable record, missing or undecodable image, a record that cannot be written), so
done + failed == inputs.

Per batch, the host prepares batch k+1 (image decode and resize in `read_threads` threads)
while the devices decode batch k; batch shapes are static (the last batch of a shard is
padded), so each captioner compiles one decoding program.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import os
import sys
import time
from typing import Any, TextIO

import jax
import ml_collections
import msgpack
import numpy as np

from dalle3_jax import metrics, sharding
from dalle3_jax.data import pipeline, records, sources
from dalle3_jax.recaption import captioners, writer

CAPTION_NAMES = ("ssc", "dsc")


def default_config() -> ml_collections.ConfigDict:
    """The recaption job's config; configs/recaption.py starts from it."""
    c = ml_collections.ConfigDict()
    c.data = sources.default_data_config()  # the input: the world's train split by default
    c.start = 0  # first input index
    c.limit = 0  # inputs to recaption from `start`; 0 = to the end of the source
    c.output_dir = "workdirs/recaption"  # output shards, manifest, failures (see writer.py)
    c.records_per_shard = 4096  # inputs per output shard = the unit of commit and of resumption
    c.captioners = ml_collections.ConfigDict()
    for name, run in (("ssc", "workdirs/captioner_short"), ("dsc", "workdirs/captioner_descriptive")):
        c.captioners[name] = ml_collections.ConfigDict()
        c.captioners[name].workdir = run  # the captioner's training run; "" = do not write this caption
        c.captioners[name].step = -1  # checkpoint step; -1 = latest (then pinned in job.json for reruns)
    c.decode = captioners.default_decode_config()  # decoding, the same for both captioners
    c.batch_size = 256  # images per decode call per process (rounded up to the data-parallel size)
    c.mesh = sharding.mesh_config()  # mesh over this process's devices (data parallel by default)
    c.read_threads = 4  # threads reading and decoding images while the devices decode captions
    c.log_every = 8  # batches between progress lines
    c.throttle_s = 0.0  # seconds to sleep after each batch (sharing a machine; tests stop a job mid-shard)
    return c


@dataclasses.dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first input index
    end: int  # one past the last input index


def plan_shards(start: int, end: int, per_shard: int) -> list[Shard]:
    """Input range [start, end) cut into consecutive ranges of per_shard inputs (the last may be shorter)."""
    return [Shard(k, lo, min(lo + per_shard, end)) for k, lo in enumerate(range(start, end, per_shard))]


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails early, naming the field, on settings that would otherwise fail mid-job."""
    for key in ("records_per_shard", "batch_size", "read_threads", "log_every"):
        if int(config[key]) < 1:
            raise ValueError(f"{key} must be >= 1, got {config[key]}")
    if config.start < 0 or config.limit < 0 or config.throttle_s < 0:
        raise ValueError(f"start, limit and throttle_s must be >= 0; got {config.start}, {config.limit}, "
                         f"{config.throttle_s}")
    if not config.output_dir:
        raise ValueError("output_dir is empty")
    unknown = sorted(set(config.captioners.keys()) - set(CAPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown captioners {unknown}; valid: {list(CAPTION_NAMES)}")
    if not any(config.captioners[n].workdir for n in config.captioners):
        raise ValueError("no captioner: set captioners.ssc.workdir and/or captioners.dsc.workdir")


# ------------------------------------------------------------------------------------------------
# Reading inputs (runs in the reader threads)
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Item:
    index: int
    id: str
    record: dict | None = None
    images: dict[int, np.ndarray] | None = None  # model input per image size
    failure: dict | None = None


def _best_id(source: Any, i: int) -> str:
    """The id of a record the source cannot decode, read from its raw msgpack if possible."""
    try:
        raw = msgpack.unpackb(source.read_raw(i), raw=False)
        if isinstance(raw, dict) and isinstance(raw.get("id"), str) and raw["id"]:
            return raw["id"]
    except Exception:  # garbage bytes, or a source without read_raw: fall back to the index
        pass
    return f"index:{i}"


def _fail(item: _Item, reason: str, error: Exception | str) -> _Item:
    detail = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    item.failure = {"id": item.id, "index": item.index, "reason": reason, "detail": detail[:500]}
    item.record = item.images = None
    return item


def _read(source: Any, i: int, sizes: tuple[int, ...]) -> _Item:
    item = _Item(i, f"index:{i}")
    try:
        record = source[i]
    except Exception as e:  # one unreadable record is a counted failure, not the end of the job
        item.id = _best_id(source, i)
        return _fail(item, getattr(e, "reason", "unreadable_record"), e)
    if not isinstance(record, dict):
        return _fail(item, "bad_record", f"the source returned a {type(record).__name__}, not a record")
    item.id = str(record.get("id") or item.id)
    if record.get("image") is None:
        return _fail(item, "missing_image", "the record has no image")
    try:
        rgb = records.decode_image(record["image"])  # once, then resized per captioner input size
        item.images = {s: pipeline.model_image(rgb, s) for s in sizes}
    except Exception as e:
        return _fail(item, getattr(e, "reason", "bad_image"), e)
    item.record = record
    return item


def _encode(item: _Item, new: dict[str, str], provenance: dict[str, Any]) -> bytes | None:
    """The output record's bytes, or None (and item.failure set) if it cannot be written."""
    rec = dict(item.record)
    rec["captions"] = {**(rec.get("captions") or {}), **new}
    rec["meta"] = {**(rec.get("meta") or {}), "recaption": provenance}
    try:
        return records.encode_record(rec)
    except Exception as e:
        _fail(item, getattr(e, "reason", "unwritable_record"), e)
        return None


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _resolve_captioners(config: ml_collections.ConfigDict, pinned: dict | None) -> list[captioners.CaptionerRef]:
    """The captioners to run; step -1 means the step pinned by the job's first run, else the latest."""
    refs = []
    for name in CAPTION_NAMES:
        c = config.captioners.get(name)
        if c is None or not c.workdir:
            continue
        step = int(c.step)
        before = (pinned or {}).get("captioners", {}).get(name, {})
        if step < 0 and before.get("workdir") == os.path.abspath(c.workdir):
            step = int(before["step"])  # "latest" means the latest when the job began
        refs.append(captioners.resolve(name, c.workdir, step, config.decode.to_dict()))
    return refs


def _job_identity(config, start: int, end: int, num_shards: int, refs) -> dict:
    return {"format": 1, "data": config.data.to_dict(), "input_start": start, "input_end": end,
            "records_per_shard": int(config.records_per_shard), "num_shards": num_shards,
            "captioners": {r.name: r.identity() for r in refs}}


def run(config: ml_collections.ConfigDict, *, stream: TextIO | None = None) -> dict:
    """Runs (or resumes) the job; returns the summary (process 0: the whole job's)."""
    stream = stream or sys.stdout

    def say(msg: str) -> None:
        print(f"recaption: {msg}", file=stream, flush=True)

    check_config(config)
    t0 = time.perf_counter()
    source = sources.make_source(config.data)
    start = int(config.start)
    end = len(source) if not config.limit else min(len(source), start + int(config.limit))
    if start >= end:
        raise ValueError(f"no inputs: start={start}, limit={config.limit}, and the source has {len(source)} records")
    shards = plan_shards(start, end, int(config.records_per_shard))
    out = writer.OutputDir(config.output_dir, len(shards))
    refs = _resolve_captioners(config, out.read_job())
    job = _job_identity(config, start, end, len(shards), refs)
    if jax.process_index() == 0 and out.read_job() is None:
        out.write_job(job)
    _barrier("recaption_job_written")
    out.check_job(job)

    run_id = _run_id()
    mine = shards[jax.process_index()::jax.process_count()]
    todo = [s for s in mine if out.committed(s.index) is None]
    stats = {"image": 0.0, "decode": 0.0, "write": 0.0, "setup": 0.0, "loop": 0.0, "inputs_done_now": 0}
    if todo:
        say(f"{len(todo)} of {len(mine)} shards to do ({sum(s.end - s.start for s in todo)} inputs) "
            f"-> {out.path}")
        _run_shards(config, source, todo, out, refs, stats, say, stream, run_id)
    stats["setup"] = time.perf_counter() - t0 - stats["loop"]
    _barrier("recaption_shards_done")
    commits = [out.committed(s.index) for s in shards]
    summary = _summary(shards, commits, run_id, stats)
    if jax.process_index() != 0:
        return summary
    if not summary["complete"]:
        missing = [s.index for s, c in zip(shards, commits) if c is None]
        say(f"incomplete: shards {missing[:10]}{'...' if len(missing) > 10 else ''} are not done; "
            "rerun the same command to finish them")
        return summary
    if not summary["shards_written_this_run"] and os.path.exists(out.file(writer.MANIFEST_FILE)):
        say(f"nothing to do: all {len(shards)} shards in {out.path} are already committed "
            f"({summary['done']} done, {summary['failed']} failed of {summary['inputs']} inputs)")
        return {**summary, "nothing_to_do": True}
    out.finish(job, commits, summary)
    say(f"{summary['inputs']} inputs: {summary['done']} done, {summary['failed']} failed "
        f"(see {writer.FAILURES_FILE}), {summary['skipped']} skipped (in shards committed by an earlier run); "
        f"{summary['images_per_s']:.1f} images/s this run")
    return summary


def _run_id() -> int:
    """A number naming this run (the same on every process), stored in each shard it commits."""
    run_id = np.int64(int.from_bytes(os.urandom(6), "little"))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        run_id = multihost_utils.broadcast_one_to_all(run_id)
    return int(run_id)


def _summary(shards, commits, run_id: int, stats) -> dict:
    done = [c for c in commits if c is not None]
    by_reason = collections.Counter()
    for c in done:
        by_reason.update(c["failed_by_reason"])
    loop = stats["loop"]
    timed = {k: stats[k] for k in ("image", "decode", "write")}
    shares = {k: v / loop for k, v in timed.items()} if loop > 0 else {}
    if shares:
        shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    return {
        "inputs": sum(s.end - s.start for s in shards),
        "done": sum(c["written"] for c in done),
        "failed": sum(c["failed"] for c in done),
        "skipped": sum(c["inputs"] for c in done if c["run"] != run_id),
        "shards": len(shards),
        "shards_committed": len(done),
        "shards_written_this_run": sum(1 for c in done if c["run"] == run_id),
        "failed_by_reason": dict(sorted(by_reason.items())),
        "complete": len(done) == len(shards),
        "seconds": loop + stats["setup"],
        "setup_seconds": stats["setup"],
        "images_per_s": stats["inputs_done_now"] / loop if loop > 0 else 0.0,
        "time_shares": shares,
    }


def _run_shards(config, source, todo: list[Shard], out: writer.OutputDir, refs, stats: dict, say, stream,
                run_id: int) -> None:
    mesh = sharding.make_mesh(config.mesh, devices=jax.local_devices())
    dp = sharding.data_parallel_size(mesh)
    batch = math.ceil(int(config.batch_size) / dp) * dp  # every device decodes whole images
    models = [captioners.Captioner(ref, mesh) for ref in refs]
    say("loaded " + ", ".join(f"{r.name} step {r.step} ({r.checkpoint})" for r in refs)
        + f"; batch {batch} on mesh {dict(mesh.shape)}")
    provenance = {r.name: r.provenance() for r in refs}
    sizes = tuple(sorted({r.image_size for r in refs}))
    image_sharding = sharding.batch_sharding(mesh, 4)
    work = [(s, lo, min(lo + batch, s.end)) for s in todo for lo in range(s.start, s.end, batch)]
    total = sum(s.end - s.start for s in todo)
    progress = metrics.Progress(total, unit="image", stream=stream)
    pool = concurrent.futures.ThreadPoolExecutor(int(config.read_threads), thread_name_prefix="recaption-read")
    ahead = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="recaption-prefetch")

    def prepare(lo: int, hi: int) -> list[_Item]:
        return list(pool.map(lambda i: _read(source, i, sizes), range(lo, hi)))

    t_loop = time.perf_counter()
    handled, shard_writer, shard_state = 0, None, None
    pending = ahead.submit(prepare, work[0][1], work[0][2])
    try:
        for w, (shard, lo, hi) in enumerate(work):
            if shard_writer is None:
                for path in out.remove_stale(shard.index):
                    say(f"removed {os.path.basename(path)} left by an interrupted run")
                shard_writer = out.open_shard(shard.index)
                shard_state = {"failures": [], "empty_captions": 0, "t0": time.perf_counter()}
            t = time.perf_counter()
            items = pending.result()
            stats["image"] += time.perf_counter() - t

            t = time.perf_counter()
            good = [it for it in items if it.failure is None]
            tokens = {}
            if good:
                ids = [it.id for it in good]
                per_size = {}
                for s in sizes:
                    host = np.stack([it.images[s] for it in good])
                    host = np.concatenate([host, np.repeat(host[-1:], batch - len(good), axis=0)])  # static shape
                    per_size[s] = jax.device_put(host, image_sharding)
                tokens = {m.ref.name: m.start(per_size[m.ref.image_size], ids) for m in models}
            if w + 1 < len(work):  # the host reads the next batch while the devices decode this one
                pending = ahead.submit(prepare, work[w + 1][1], work[w + 1][2])
            texts = {m.ref.name: m.texts(tokens[m.ref.name], len(good)) for m in models if tokens}
            stats["decode"] += time.perf_counter() - t

            t = time.perf_counter()
            new = [{name: texts[name][j] for name in texts} for j in range(len(good))]
            shard_state["empty_captions"] += sum(1 for caps in new for v in caps.values() if not v)
            encoded = dict(zip((it.index for it in good),
                               pool.map(lambda a: _encode(a[0], a[1], provenance), zip(good, new))))
            for it in items:  # input order; failures in place of their record
                data = encoded.get(it.index)
                if data is not None:
                    shard_writer.write_raw(data)
                else:
                    shard_state["failures"].append(it.failure)
            if hi == shard.end:
                failures = shard_state["failures"]
                out.commit(shard.index, shard_writer, {
                    "input_start": shard.start, "input_end": shard.end, "inputs": shard.end - shard.start,
                    "failed": len(failures), "failures": failures,
                    "failed_by_reason": dict(collections.Counter(f["reason"] for f in failures)),
                    "empty_captions": shard_state["empty_captions"], "process": jax.process_index(), "run": run_id,
                    "seconds": time.perf_counter() - shard_state["t0"]})
                shard_writer = None
            stats["write"] += time.perf_counter() - t

            handled += hi - lo
            stats["inputs_done_now"] = handled
            if (w + 1) % int(config.log_every) == 0 or w + 1 == len(work):
                progress.update(handled, force=True)
            if config.throttle_s:
                time.sleep(float(config.throttle_s))
    finally:
        if shard_writer is not None:  # an exception mid-shard: drop the partial shard, keep committed ones
            shard_writer.abort()
        progress.close()
        pool.shutdown(wait=True, cancel_futures=True)
        ahead.shutdown(wait=True, cancel_futures=True)
        stats["loop"] = time.perf_counter() - t_loop
