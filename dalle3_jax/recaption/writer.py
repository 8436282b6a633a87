"""The recaption job's output directory: job identity, per-shard commits, manifest and failures.

    OUTPUT_DIR/
      job.json                                 what this directory is the output of (inputs,
                                               captioners with checkpoint and step, decode
                                               settings); a rerun must match it exactly
      recaptioned-00003-of-00010.array_record  output shard 3: the records of input range 3
      shards/00003.json                        shard 3's commit record: counts and failures
      manifest.json                            every shard with its counts (at the end)
      failures.jsonl                           one line per input that has no output record:
                                               id, index, shard, reason, detail (at the end)
      summary.json                             done / failed / skipped totals (at the end)

Exactly once. Input range k always becomes output shard k. The shard is written under a temp
name and renamed into place (ArrayRecordShardWriter), then its commit record is written
(again temp + rename). A shard counts as done only when both exist; so after a kill -9 at any
moment a shard is either done, or redone from scratch by the next run, which overwrites any
orphaned data file with an identical one (decoding is deterministic) and deletes stale temp
files. No output record is ever appended to a shard that was already renamed into place.
"""

from __future__ import annotations

import glob
import json
import os
import uuid
from typing import Any, Iterable

from dalle3_jax.data.sources import ArrayRecordShardWriter

JOB_FILE = "job.json"
MANIFEST_FILE = "manifest.json"
FAILURES_FILE = "failures.jsonl"
SUMMARY_FILE = "summary.json"
SHARD_PREFIX = "recaptioned"


class JobMismatch(ValueError):
    """The output directory holds (part of) a job with other inputs, captioners or settings."""


def write_json(path: str, obj: Any) -> None:
    """Writes JSON so that readers see the old file or the new one, never a torn one."""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _diff(old: Any, new: Any, where: str = "") -> list[str]:
    """Dotted paths at which two JSON values differ (for a readable mismatch error)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key, "<absent>"), new.get(key, "<absent>"), f"{where}.{key}" if where else key)
        return out
    return [] if old == new else [f"{where}: {old!r} in the directory, {new!r} now"]


class OutputDir:
    """One job's output directory; every method is safe to call again after a crash."""

    def __init__(self, path: str, num_shards: int):
        self.path = os.path.abspath(path)
        self.num_shards = int(num_shards)

    # -- names ------------------------------------------------------------------------------------

    def shard_file(self, k: int) -> str:
        return f"{SHARD_PREFIX}-{k:05d}-of-{self.num_shards:05d}.array_record"

    def shard_path(self, k: int) -> str:
        return os.path.join(self.path, self.shard_file(k))

    def commit_path(self, k: int) -> str:
        return os.path.join(self.path, "shards", f"{k:05d}.json")

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    # -- job identity -----------------------------------------------------------------------------

    def read_job(self) -> dict | None:
        path = self.file(JOB_FILE)
        return read_json(path) if os.path.exists(path) else None

    def write_job(self, job: dict) -> None:
        os.makedirs(os.path.join(self.path, "shards"), exist_ok=True)
        write_json(self.file(JOB_FILE), job)

    def check_job(self, job: dict) -> None:
        """Raises JobMismatch unless job.json holds exactly `job` (it must exist)."""
        old = self.read_job()
        if old is None:
            raise FileNotFoundError(f"{self.file(JOB_FILE)} is missing")
        differences = _diff(old, job)
        if differences:
            raise JobMismatch(
                f"{self.path} holds the output of another recaption job; its shards cannot be mixed with "
                "this one's. Use a new output_dir, or rerun with the original settings. Differences:\n  "
                + "\n  ".join(differences))

    # -- shards -----------------------------------------------------------------------------------

    def committed(self, k: int) -> dict | None:
        """Shard k's commit record if the shard is done (record and data file both present)."""
        path = self.commit_path(k)
        if not os.path.exists(path) or not os.path.exists(self.shard_path(k)):
            return None
        return read_json(path)

    def remove_stale(self, k: int) -> list[str]:
        """Deletes what a killed attempt at shard k left behind (its temp files, and a data file
        renamed into place whose commit record was never written). Only the process that owns
        shard k may call this."""
        stale = glob.glob(glob.escape(self.shard_path(k)) + ".tmp-*")
        if not os.path.exists(self.commit_path(k)) and os.path.exists(self.shard_path(k)):
            stale.append(self.shard_path(k))
        for path in stale:
            os.remove(path)
        return stale

    def open_shard(self, k: int) -> ArrayRecordShardWriter:
        """A writer for shard k's data; it lands under its final name only on close()."""
        return ArrayRecordShardWriter(self.shard_path(k))

    def commit(self, k: int, writer: ArrayRecordShardWriter, record: dict) -> None:
        """Finishes shard k: data file renamed into place, then its commit record written."""
        writer.close()
        write_json(self.commit_path(k), {**record, "shard": k, "file": self.shard_file(k), "written": writer.count})

    # -- the end ----------------------------------------------------------------------------------

    def finish(self, job: dict, commits: Iterable[dict], summary: dict) -> dict:
        """Writes failures.jsonl, manifest.json and summary.json from every shard's commit
        record (process 0 only, once every shard is done); returns the manifest."""
        commits = sorted(commits, key=lambda c: c["shard"])
        tmp = self.file(f"{FAILURES_FILE}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            for c in commits:
                for failure in c["failures"]:
                    f.write(json.dumps({**failure, "shard": c["shard"]}, sort_keys=True) + "\n")
        os.replace(tmp, self.file(FAILURES_FILE))
        keep = ("shard", "file", "input_start", "input_end", "inputs", "written", "failed", "failed_by_reason",
                "empty_captions")
        manifest = {
            "job": job,
            "num_shards": self.num_shards,
            "inputs": sum(c["inputs"] for c in commits),
            "written": sum(c["written"] for c in commits),
            "failed": sum(c["failed"] for c in commits),
            "shards": [{k: c[k] for k in keep} for c in commits],
        }
        write_json(self.file(MANIFEST_FILE), manifest)
        write_json(self.file(SUMMARY_FILE), summary)
        return manifest
