"""Converts img2dataset output into ArrayRecord shards in the record schema (records.py).

Inputs (one unit of work per input file, converted in parallel with --workers):
  * WebDataset tar shards ("dir/*.tar", also .tar.gz/.tgz): members are grouped by key (the
    member path up to the first dot of its basename, as WebDataset does; img2dataset writes a
    key's members next to each other). Image from .jpg/.jpeg/.png/.webp, caption from .txt or
    else the "caption" of .json; url/key/original size from .json go to meta. Members are read
    in memory from the stream, never extracted to disk.
  * Parquet + image folder: one row per sample; columns are configurable; the image comes from
    --image_column (bytes, an {"bytes", "path"} struct, or a path under --images) or from
    --image_pattern ("{key}.jpg") under --images.

Output directory:
  prepared-00000-of-000NN.array_record   the records; at most records_per_shard per shard. A shard
                                         never spans two inputs, so inputs convert independently
  rejects.jsonl                          one line per rejected sample: id, source, reason, detail
  summary.json                           counts: read, written, rejected (by reason), normalised
                                         (by reason), input errors; read == written + rejected
  prepare_state.json                     resume state: converted inputs and their shards
  work/<input>-<hash>/                   per-input part files while converting, and its rejects

Nothing is dropped silently: every sample read is written (maybe normalised, counted by reason)
or rejected (counted, and listed in rejects.jsonl), and one bad sample never stops the run. A
truncated tar is reported in summary.json["input_errors"] and the part before the damage kept.

Resuming: every part file is committed atomically (temp + rename); an input enters the state
file only once all its parts are committed, so a rerun skips converted inputs (and says so) and
redoes a half-converted one from scratch. The final numbering ("-of-NN" needs the total) is a
journalled two-step rename, finished by the next run if interrupted.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import multiprocessing
import os
import posixpath
import shutil
import sys
import tarfile
import time
import zlib
from typing import Any, Iterator

from dalle3_jax.data import records as R
from dalle3_jax.data.sources import ArrayRecordShardWriter

STATE_FILE = "prepare_state.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # in order of preference when a key has several
MAX_MEMBER_BYTES = 64 << 20  # a larger tar member is not an image we want in memory

DEFAULT_SETTINGS = dict(
    records_per_shard=1000, min_side=R.MIN_SIDE, max_side=R.MAX_SIDE, max_pixels=R.MAX_PIXELS,
    max_caption_chars=R.MAX_CAPTION_CHARS, jpeg_quality=95, caption_name="alt",
    images=None, id_column="key", caption_column="caption", image_column=None, image_pattern="{key}.jpg",
)
_META_KEYS = ("url", "key", "width", "height", "original_width", "original_height")


class _Reject(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason, self.detail = reason, detail or reason


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _unsafe_member(name: str) -> bool:
    # Never extracted, but a "../" or absolute name means a hostile or broken writer.
    return name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/") or (
        len(name) > 1 and name[1] == ":")


def _split_member(name: str) -> tuple[str, str]:
    d, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(d, stem) if d else stem), ext.lower()


# ----------------------------------------------------------------------------- readers


def _iter_tar(path: str, errors: list[str]) -> Iterator[dict]:
    """Yields one sample dict per key: {"id", "members": {ext: bytes}, "flags": [...]}."""
    try:
        tf = tarfile.open(path, mode="r|*")  # a stream: no seeking, works on truncated files
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        errors.append(f"cannot open as tar: {e}")
        return
    group: dict | None = None
    n_members = 0
    with tf:
        try:
            for m in tf:
                if m.isdir():
                    continue
                key, ext = _split_member(m.name)
                if group is not None and key != group["id"]:
                    yield group
                    group = None
                if group is None:
                    group = {"id": key, "members": {}, "names": [], "flags": []}
                group["names"].append(m.name)
                if _unsafe_member(m.name):
                    group["flags"].append(("unsafe_path", f"member name {m.name!r}"))
                if not m.isfile():
                    group["flags"].append(("not_a_file", f"member {m.name!r} is a link or device"))
                    continue
                if m.size > MAX_MEMBER_BYTES:
                    group["flags"].append(("member_too_large", f"{m.name!r} is {m.size} bytes"))
                    continue
                group["truncated"] = True  # cleared once the data is fully read
                data = tf.extractfile(m).read()
                del group["truncated"]
                n_members += 1
                group["members"].setdefault(ext, data)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            errors.append(f"corrupt or truncated tar after {n_members} complete members: {e}")
            if group is not None and group.pop("truncated", False):
                group["flags"].append(("truncated_input", f"tar ends inside {group['names'][-1]!r}"))
    if group is not None:
        yield group


def _tar_sample(group: dict, s: dict) -> tuple[str, bytes, Any, dict, list[str]]:
    """(id, image bytes, raw caption, meta, notes) from a tar group, or raises _Reject."""
    if group["flags"]:
        raise _Reject(*group["flags"][0])
    members = group["members"]
    images = [e for e in IMAGE_EXTS if e in members]
    notes = ["multiple_images"] if len(images) > 1 else []
    meta: dict = {}
    caption = members.get("txt")
    if "json" in members:
        try:
            info = json.loads(members["json"])
            if not isinstance(info, dict):
                raise ValueError("not an object")
            meta = {k: info[k] for k in _META_KEYS if info.get(k) is not None}
            if caption is None:
                caption = info.get("caption")
        except ValueError:
            notes.append("bad_json")
    if not images:
        raise _Reject("missing_image", f"members {group['names']} have no image")
    if caption is None:
        raise _Reject("missing_caption", f"members {group['names']} have no .txt or json caption")
    return group["id"], members[images[0]], caption, meta, notes


def _safe_join(root: str, rel: str) -> str:
    if os.path.isabs(rel) or _unsafe_member(rel):
        raise _Reject("unsafe_path", f"image path {rel!r}")
    return os.path.join(root, rel)


def _iter_parquet(path: str, s: dict, errors: list[str]) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for damaged files
        errors.append(f"cannot open as parquet: {e}")
        return
    names = set(pf.schema_arrow.names)
    for col in (s["id_column"], s["caption_column"], s["image_column"]):
        if col and col not in names:
            raise ValueError(f"{path}: no column {col!r}; columns are {sorted(names)}")
    if not s["image_column"] and not s["images"]:
        raise ValueError("parquet input needs --images DIR (or --image_column)")
    row_no = 0
    try:
        for batch in pf.iter_batches(batch_size=256):
            for row in batch.to_pylist():
                rid = row.get(s["id_column"])
                rid = str(rid) if rid not in (None, "") else f"{os.path.basename(path)}#{row_no}"
                yield {"id": rid, "row": row, "row_no": row_no}
                row_no += 1
    except Exception as e:
        errors.append(f"parquet read failed after {row_no} rows: {e}")


def _parquet_sample(item: dict, s: dict, source: str) -> tuple[str, bytes, Any, dict, list[str]]:
    row, rid = item["row"], item["id"]
    meta = {k: row[k] for k in _META_KEYS if row.get(k) is not None and k != s["id_column"]}
    if row.get("status") not in (None, "success"):  # img2dataset lists failed downloads too
        raise _Reject("not_downloaded", f"status {row['status']!r}: {row.get('error_message')}")
    caption = row.get(s["caption_column"])
    if s["image_column"]:
        v = row.get(s["image_column"])
        if isinstance(v, dict):  # Hugging Face style {"bytes": ..., "path": ...}
            v = v.get("bytes") or v.get("path")
        if isinstance(v, str) and s["images"]:
            v = _safe_join(s["images"], v)
        elif isinstance(v, str):
            raise _Reject("unsafe_path", f"image path {v!r} without --images")
    else:
        v = _safe_join(s["images"], s["image_pattern"].format(key=rid, id=rid))
    if isinstance(v, str):
        try:
            with open(v, "rb") as f:
                v = f.read()
        except OSError as e:
            raise _Reject("missing_image", f"{v}: {e.strerror}")
    if not isinstance(v, (bytes, bytearray)) or not v:
        raise _Reject("missing_image", f"no image for row {item['row_no']}")
    if caption is None:
        raise _Reject("missing_caption", f"column {s['caption_column']!r} is null")
    return rid, bytes(v), caption, meta, []


# ----------------------------------------------------------------------------- one input


def _to_record(sample: tuple, s: dict, source: str) -> tuple[dict, list[str]]:
    rid, image, caption, meta, notes = sample
    try:
        text, why_text = R.normalise_caption(caption, max_chars=s["max_caption_chars"])
        img, why_img, (h, w) = R.normalise_image_bytes(
            image, min_side=s["min_side"], max_side=s["max_side"], max_pixels=s["max_pixels"],
            jpeg_quality=s["jpeg_quality"])
    except R.RecordError as e:
        raise _Reject(e.reason, str(e)) from None
    reasons = notes + why_text + why_img
    meta = {**meta, "source": source, "width": w, "height": h}
    if reasons:
        meta["normalised"] = reasons
    return {"id": rid, "image": img, "captions": {s["caption_name"]: text}, "meta": meta}, reasons


def convert_input(path: str, work_dir: str, settings: dict) -> dict:
    """Converts one input file into part shards under work_dir; returns its counts.

    Runs in a worker process. The caller records the result in the state file, which is what
    makes the input count as done; a crash leaves only a work_dir the next run wipes.
    """
    s = {**DEFAULT_SETTINGS, **settings}
    shutil.rmtree(work_dir, ignore_errors=True)
    os.makedirs(work_dir)
    source = os.path.basename(path)
    errors: list[str] = []
    is_tar = not path.endswith(".parquet")
    items = _iter_tar(path, errors) if is_tar else _iter_parquet(path, s, errors)
    read, written = 0, 0
    rejected: collections.Counter = collections.Counter()
    normalised: collections.Counter = collections.Counter()
    shards: list[str] = []
    writer = None
    seen: set[str] = set()
    t0 = last = time.time()
    with open(os.path.join(work_dir, "rejects.jsonl"), "w") as rej:
        for item in items:
            read += 1
            rid = item["id"]
            try:
                if rid in seen:  # e.g. a key's tar members not next to each other
                    raise _Reject("duplicate_id", f"id {rid!r} seen before in this input")
                seen.add(rid)
                sample = _tar_sample(item, s) if is_tar else _parquet_sample(item, s, source)
                rec, reasons = _to_record(sample, s, source)
                data = R.encode_record(rec)
            except _Reject as e:
                rejected[e.reason] += 1
                rej.write(json.dumps({"id": rid, "source": path, "reason": e.reason, "detail": e.detail}) + "\n")
                continue
            if writer is None:
                part = os.path.join(work_dir, f"part-{len(shards):05d}.array_record")
                writer = ArrayRecordShardWriter(part)
            writer.write_raw(data)
            written += 1
            normalised.update(reasons)
            if writer.count >= s["records_per_shard"]:
                writer.close()
                shards.append(writer.path)
                writer = None
            if time.time() - last > 10:
                last = time.time()
                print(f"[prepare] {source}: {read} read, {(read) / (last - t0):.0f} records/s", flush=True)
        if writer is not None:
            writer.close()
            shards.append(writer.path)
    elapsed = time.time() - t0
    return {
        "input": path, "size": os.path.getsize(path), "work_dir": work_dir, "read": read,
        "written": written, "rejected": sum(rejected.values()), "rejected_by_reason": dict(rejected),
        "normalised_by_reason": dict(normalised), "shards": shards, "error": "; ".join(errors) or None,
        "seconds": round(elapsed, 3),
    }


def _convert_star(args) -> dict:
    return convert_input(*args)


# ----------------------------------------------------------------------------- the job


def expand_inputs(inputs: str | list[str]) -> list[str]:
    out = []
    for pattern in [inputs] if isinstance(inputs, str) else inputs:
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        found = [p for p in found if os.path.isfile(p)]
        if not found:
            raise FileNotFoundError(f"no input files match {pattern!r}")
        out += [os.path.abspath(p) for p in found]
    for p in out:
        if not p.endswith((".tar", ".tar.gz", ".tgz", ".parquet")):
            raise ValueError(f"{p}: expected a WebDataset .tar(.gz) or a .parquet file")
    return sorted(set(out))


def _finish_renames(out: str, state: dict) -> None:
    """Runs (or resumes) the journalled renames: every src -> src.renaming, then -> dst.

    Two steps because a new numbering can give one shard the name another still has.
    """
    pend = state.get("pending")
    if not pend:
        return
    ab = lambda p: os.path.join(out, p)  # noqa: E731
    if pend["phase"] == "A":
        for _, _, src, dst in pend["plan"]:
            if os.path.exists(ab(src)) and not os.path.exists(ab(dst) + ".renaming"):
                os.replace(ab(src), ab(dst) + ".renaming")
        pend["phase"] = "B"
        _write_json_atomic(ab(STATE_FILE), state)
    for inp, j, _, dst in pend["plan"]:
        if os.path.exists(ab(dst) + ".renaming"):
            os.replace(ab(dst) + ".renaming", ab(dst))
        state["inputs"][inp]["shards"][j] = dst
    state["pending"] = None
    _write_json_atomic(ab(STATE_FILE), state)


def _finalize(out: str, state: dict) -> list[str]:
    order = [(inp, j, sh) for inp in sorted(state["inputs"]) for j, sh in enumerate(state["inputs"][inp]["shards"])]
    n = len(order)
    final = [f"prepared-{g:05d}-of-{n:05d}.array_record" for g in range(n)]
    plan = [(inp, j, sh, dst) for (inp, j, sh), dst in zip(order, final) if sh != dst]
    if plan:
        state["pending"] = {"phase": "A", "plan": plan}
        _write_json_atomic(os.path.join(out, STATE_FILE), state)
        _finish_renames(out, state)
    for stale in glob.glob(os.path.join(out, "prepared-*-of-*.array_record")):
        if os.path.basename(stale) not in final:  # from a run whose inputs were reconverted
            os.remove(stale)
    return final


def prepare(inputs: str | list[str], output: str, *, workers: int = 1, log=print, **settings) -> dict:
    """Converts `inputs` (globs of .tar / .parquet) into shards in `output`; returns the summary.

    settings: see DEFAULT_SETTINGS (records_per_shard, min_side, max_side, max_pixels,
    max_caption_chars, jpeg_quality, caption_name, and for parquet images, id_column,
    caption_column, image_column, image_pattern).
    """
    t0 = time.time()
    unknown = set(settings) - set(DEFAULT_SETTINGS)
    if unknown:
        raise TypeError(f"unknown settings {sorted(unknown)}; known: {sorted(DEFAULT_SETTINGS)}")
    s = {**DEFAULT_SETTINGS, **settings}
    if s["images"]:
        s["images"] = os.path.abspath(s["images"])
    paths = expand_inputs(inputs)
    os.makedirs(output, exist_ok=True)
    state_path = os.path.join(output, STATE_FILE)
    if os.path.exists(state_path):
        with open(state_path) as f:
            state = json.load(f)
        if state["settings"] != s:
            diff = {k: (state["settings"].get(k), s[k]) for k in s if state["settings"].get(k) != s[k]}
            raise ValueError(f"{output} was prepared with other settings (was, now): {diff}; "
                             f"use a new --output or the same settings")
        _finish_renames(output, state)
    else:
        state = {"version": 1, "settings": s, "inputs": {}, "pending": None}

    def rel(p):
        return os.path.relpath(p, output)

    todo = []
    for p in paths:
        done = state["inputs"].get(p)
        if done and done["size"] == os.path.getsize(p):
            continue
        if done:  # the input changed since: redo it, and drop what it produced before
            log(f"[prepare] {p} changed size since it was converted; converting it again")
            for sh in done["shards"]:
                if os.path.exists(os.path.join(output, sh)):
                    os.remove(os.path.join(output, sh))
            del state["inputs"][p]
        tag = hashlib.sha1(p.encode()).hexdigest()[:10]
        todo.append((p, os.path.join(output, "work", f"{os.path.basename(p)}-{tag}"), s))
    skipped = len(paths) - len(todo)
    if skipped:
        log(f"[prepare] skipping {skipped} of {len(paths)} inputs already converted in {output}")
    log(f"[prepare] converting {len(todo)} inputs with {min(workers, max(len(todo), 1))} worker(s)")

    n_read = 0

    def record(res: dict) -> None:
        nonlocal n_read
        res["shards"] = [rel(p) for p in res["shards"]]
        res["work_dir"] = rel(res["work_dir"])
        state["inputs"][res["input"]] = res
        _write_json_atomic(state_path, state)  # the commit point for this input
        n_read += res["read"]
        rate = n_read / max(time.time() - t0, 1e-9)
        log(f"[prepare] {len(state['inputs'])}/{len(paths)} inputs: {os.path.basename(res['input'])} "
            f"{res['written']} written, {res['rejected']} rejected"
            + (f", INPUT ERROR: {res['error']}" if res["error"] else "") + f"; {rate:.0f} records/s")

    if workers <= 1 or len(todo) <= 1:
        for args in todo:
            record(convert_input(*args))
    elif todo:
        # spawn, not fork: the parent may have started JAX's threads, which fork would copy.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(workers, len(todo))) as pool:
            for res in pool.imap_unordered(_convert_star, todo):
                record(res)

    final = _finalize(output, state)
    return _write_summary(output, state, final, skipped, len(todo), time.time() - t0, log)


def _write_summary(output, state, final, skipped, converted, elapsed, log) -> dict:
    from array_record.python.array_record_module import ArrayRecordReader

    inputs = [state["inputs"][p] for p in sorted(state["inputs"])]
    rejected, normalised = collections.Counter(), collections.Counter()
    for r in inputs:
        rejected.update(r["rejected_by_reason"])
        normalised.update(r["normalised_by_reason"])
    # rejects.jsonl gathers the per-input reject lists in input order (atomic, like the rest).
    tmp = os.path.join(output, "rejects.jsonl.tmp")
    with open(tmp, "w") as out:
        for r in inputs:
            with open(os.path.join(output, r["work_dir"], "rejects.jsonl")) as f:
                shutil.copyfileobj(f, out)
    os.replace(tmp, os.path.join(output, "rejects.jsonl"))
    on_disk = 0
    for name in final:
        reader = ArrayRecordReader(os.path.join(output, name))
        on_disk += reader.num_records()
        reader.close()
    summary = {
        "output": os.path.abspath(output), "inputs": len(inputs), "inputs_converted": converted,
        "inputs_skipped": skipped, "read": sum(r["read"] for r in inputs),
        "written": sum(r["written"] for r in inputs), "rejected": sum(r["rejected"] for r in inputs),
        "rejected_by_reason": dict(sorted(rejected.items())),
        "normalised_by_reason": dict(sorted(normalised.items())),
        "shards": len(final), "records_in_shards": on_disk,
        "input_errors": {r["input"]: r["error"] for r in inputs if r["error"]},
        "seconds": round(elapsed, 2),
    }
    # The accounting guarantee: a failure here is a bug in this file, never in the data.
    assert summary["read"] == summary["written"] + summary["rejected"], summary
    assert summary["records_in_shards"] == summary["written"], summary
    _write_json_atomic(os.path.join(output, "summary.json"), summary)
    log(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> dict:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, action="append",
                   help="glob of WebDataset .tar shards or .parquet files (repeatable)")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--workers", type=int, default=1, help="processes, one input file at a time each")
    p.add_argument("--images", default=None, help="image folder for parquet input")
    for key, val in DEFAULT_SETTINGS.items():
        if key == "images":
            continue
        kind = int if isinstance(val, int) else str
        p.add_argument(f"--{key}", type=kind, default=val, help=f"default: {val}")
    args = vars(p.parse_args(argv))
    inputs, output, workers = args.pop("input"), args.pop("output"), args.pop("workers")
    return prepare(inputs, output, workers=workers, **args)


if __name__ == "__main__":
    main(sys.argv[1:])
