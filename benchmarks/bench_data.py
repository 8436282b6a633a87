"""Input throughput: rendering the world, reading ArrayRecord shards, and the full Grain pipeline.

    python benchmarks/bench_data.py            # a table
    python benchmarks/bench_data.py --json     # one JSON object (for the benchmark report)

Three numbers, each measured in this run:
  synthetic_images_per_s    WorldSource[i] in a loop, one process: the cost of rendering
  arrayrecord_images_per_s  records read from ArrayRecord shards (written first to a temp dir
                            from world examples) and their PNGs decoded, one process
  pipeline_images_per_s     make_loader over the world source: 64 px, global batch 256, two
                            worker processes, resized, normalised and tokenised; timed in
                            steady state after warm-up batches (worker start-up excluded)

The defaults finish in well under two minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402


def bench_synthetic(n: int, image_size: int) -> dict:
    from dalle3_jax.data.world import WorldConfig, WorldSource

    source = WorldSource("train", WorldConfig(seed=0, image_size=image_size))
    source[0]  # first-call setup (palettes, fonts) is not throughput
    start = time.perf_counter()
    for i in range(1, n + 1):
        source[i]["image"]
    seconds = time.perf_counter() - start
    return {"synthetic_images_per_s": n / seconds, "synthetic_seconds": seconds}


def bench_arrayrecord(n: int, image_size: int, shards: int) -> dict:
    from dalle3_jax.data import records, sources
    from dalle3_jax.data.world import WorldConfig, WorldSource

    world = WorldSource("train", WorldConfig(seed=0, image_size=image_size))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = [os.path.join(tmp, f"world-{s:05d}-of-{shards:05d}.array_record") for s in range(shards)]
        for s, path in enumerate(paths):  # contiguous index ranges per shard, as prepare writes them
            with sources.ArrayRecordShardWriter(path) as writer:
                for i in range(s * n // shards, (s + 1) * n // shards):
                    writer.write(world[i])
        write_seconds = time.perf_counter() - start
        source = sources.ArrayRecordSource(paths)
        assert len(source) == n, (len(source), n)
        start = time.perf_counter()
        for i in range(n):
            records.decode_image(source[i]["image"])
        seconds = time.perf_counter() - start
        # Stored record size (PNG + captions + scene), not file size: files are padded to blocks.
        record_bytes = sum(len(source.read_raw(i)) for i in range(0, n, max(1, n // 100)))
        record_bytes /= len(range(0, n, max(1, n // 100)))
    return {"arrayrecord_images_per_s": n / seconds, "arrayrecord_seconds": seconds,
            "arrayrecord_write_seconds": write_seconds, "arrayrecord_bytes_per_record": record_bytes}


def bench_pipeline(batch: int, batches: int, warmup: int, workers: int, image_size: int, max_text_len: int) -> dict:
    from dalle3_jax.data import pipeline
    from dalle3_jax.data.world import WorldConfig, WorldSource

    source = WorldSource("train", WorldConfig(seed=0, image_size=image_size))
    # Rendering holds the GIL: one reader thread per worker keeps reads overlapped with batching.
    read_threads = 1 if workers else 2
    ds = pipeline.make_loader(source, global_batch_size=batch, image_size=image_size, caption_field="alt",
                              max_text_len=max_text_len, seed=0, worker_count=workers, worker_buffer_size=2,
                              read_threads=read_threads, process_index=0, process_count=1)
    start = time.perf_counter()
    it = iter(ds)
    try:
        for _ in range(warmup):
            b = next(it)
        warm_seconds = time.perf_counter() - start
        n_tokens = 0
        start = time.perf_counter()
        for _ in range(batches):
            b = next(it)
            n_tokens += int(b["text_len"].sum())
        seconds = time.perf_counter() - start
    finally:
        if hasattr(it, "close"):
            it.close()
    return {"pipeline_images_per_s": batch * batches / seconds, "pipeline_tokens_per_s": n_tokens / seconds,
            "pipeline_seconds": seconds, "pipeline_warmup_seconds": warm_seconds,
            "pipeline_read_threads": read_threads}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--n", type=int, default=2000, help="images for the synthetic and ArrayRecord loops")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256, help="pipeline global batch size")
    parser.add_argument("--batches", type=int, default=20, help="timed pipeline batches")
    parser.add_argument("--warmup", type=int, default=2, help="untimed pipeline batches")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-text-len", type=int, default=64)
    args = parser.parse_args(argv)
    # Grain worker processes read absl flags; this script does not run absl.app.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()

    total = time.perf_counter()
    result = {
        "settings": {"n": args.n, "shards": args.shards, "image_size": args.image_size, "batch": args.batch,
                     "batches": args.batches, "warmup": args.warmup, "workers": args.workers,
                     "max_text_len": args.max_text_len, "cpu_count": os.cpu_count()},
    }
    result.update(bench_synthetic(args.n, args.image_size))
    result.update(bench_arrayrecord(args.n, args.image_size, args.shards))
    result.update(bench_pipeline(args.batch, args.batches, args.warmup, args.workers, args.image_size,
                                 args.max_text_len))
    result["total_seconds"] = time.perf_counter() - total
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if key == "settings":
                print("  ".join(f"{k}={v}" for k, v in value.items()))
            else:
                print(f"{key:32s} {value:12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
