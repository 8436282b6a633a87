"""Recaptioning throughput: the recaption job on 2,048 synthetic images with the default DSC
captioner size, against the same job captioning one image at a time.

    python benchmarks/bench_recaption.py --json     # one JSON object (the benchmark report)
    python benchmarks/bench_recaption.py --quick    # 512 images, a table

What is measured. The first N world train images are rendered and written as PNG records into
an ArrayRecord input (setup, not timed), a captioner run directory is made holding the default
DSC captioner (configs/captioner_descriptive.py: CoCa "tiny" with the 3-conv stem, vocabulary
1024, 80-token captions) at random initialisation, and `dalle3_jax.recaption.job.run` recaptions
the input with it exactly as launch/recaption.py would: read records, decode and resize images
(reader threads), decode captions in batches of `--batch` over every local device, write the
output shards. Compilation is excluded: a short warm-up job with the same batch shape runs first.

  images_per_s          inputs / wall time of the timed job's loop (read, decode, write)
  time_shares           the loop's wall time split into waiting for prepared images
                        ("image_decode": the host could not keep ahead of the devices),
                        dispatching and waiting for the decoder plus detokenising
                        ("decoding"), encoding and writing records ("writing"), other
  speedup_vs_per_image  images_per_s / the same job's rate with batch size 1 (same decoder,
                        same settings, same reading and writing), measured on the first
                        `--per-image-n` images because it is slow

A randomly initialised model rarely emits eos, and a trained DSC stops at its caption's end
(15-60 words, about 20-76 tokens). To measure a known amount of work, eos is banned until the
last token (min_len = max_len = 80) unless --allow-eos is given; every caption is then exactly
80 tokens, an upper bound on the work of real captions.

On the 2-core CPU this was written on (1 XLA device, load average 6-7 from other jobs), the
batched job made 80-126 images/s and one-at-a-time 22-34 images/s: a 3-6x speedup, well short of
the 20x target. Decoding is 99% of the job's time, and at batch >= 64 a decode step costs about
the same per image at any batch size, because a CPU step is bound by reading each image's KV
cache, which batching does not share; batching only removes the per-step overhead that
dominates batch 1. Where a step is launch-bound instead (GPU/TPU), the ratio is far larger.
A run takes under a minute (--quick: about 30 s).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def log(msg: str) -> None:
    print(f"[bench_recaption] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quick", action="store_true", help="512 images and 32 one-at-a-time images")
    p.add_argument("--images", type=int, default=2048, help="images recaptioned by the timed job")
    p.add_argument("--per-image-n", type=int, default=128, help="images captioned one at a time for the baseline")
    p.add_argument("--batch", type=int, default=256, help="decode batch of the job (config batch_size)")
    p.add_argument("--read-threads", type=int, default=4, help="reader threads (config read_threads)")
    p.add_argument("--max-len", type=int, default=80, help="caption tokens (the DSC's eval.decode.max_len)")
    p.add_argument("--allow-eos", action="store_true", help="let captions end at eos (default: full length)")
    p.add_argument("--workdir", default="", help="keep inputs and outputs here (default: a temp dir)")
    a = p.parse_args(argv)
    if a.quick:
        a.images, a.per_image_n = min(a.images, 512), min(a.per_image_n, 32)
    return a


def make_input(path: str, n: int) -> None:
    """The first n world train images as PNG records in one ArrayRecord file."""
    from dalle3_jax.data import sources

    world = sources.make_source(sources.default_data_config())
    with sources.ArrayRecordShardWriter(path) as w:
        for i in range(n):
            w.write(world[i])  # encode_record stores the rendered pixels as PNG


def make_captioner_run(workdir: str, max_len: int) -> int:
    """A run directory with the default DSC captioner config and its random-init weights (step 0).

    Returns the parameter count."""
    import jax
    from flax import nnx

    from dalle3_jax import checkpoint, optim, sharding
    from dalle3_jax.trainers import captioner, loop

    config = captioner.finetune_config(_variant(), caption_field="descriptive")
    config.eval.decode.max_len = max_len
    loop.save_config(config, workdir)
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1, num_devices=0))
    with jax.set_mesh(mesh):
        model = sharding.create_sharded(lambda: captioner.make_model(config), mesh)
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        ckpt.save(0, {"model": nnx.state(model)}, config=config, force=True)
    return optim.count_params(model)


def _variant():
    from dalle3_jax import configlib

    return configlib.parse_arg("init_from=none", tiny=False, model="tiny", steps=0, init_from="")


def run_job(a: argparse.Namespace, root: str, name: str, n: int, batch: int) -> dict:
    from dalle3_jax.recaption import job

    config = job.default_config()
    config.data.source, config.data.arrayrecord_pattern = "arrayrecord", os.path.join(root, "input.array_record")
    config.limit, config.batch_size, config.read_threads = n, batch, a.read_threads
    config.records_per_shard = 1024
    config.log_every = 10**9  # no progress lines inside the timed loop; the summary has the rate
    config.output_dir = os.path.join(root, name)
    config.captioners.ssc.workdir = ""
    config.captioners.dsc.workdir = os.path.join(root, "dsc_run")
    config.decode.max_len = a.max_len
    config.decode.min_len = 0 if a.allow_eos else a.max_len
    start = time.perf_counter()
    summary = job.run(config, stream=io.StringIO())
    summary["wall_s"] = time.perf_counter() - start
    if summary["done"] != n:
        raise RuntimeError(f"{name}: {summary['done']} of {n} images captioned; see {config.output_dir}")
    return summary


def main(argv=None) -> dict:
    a = parse_args(argv)
    import jax

    from benchmarks import common
    from dalle3_jax import runtime

    runtime.init(log_level=40)  # errors only: stdout stays one JSON object
    load = os.getloadavg()[0]
    tmp = None if a.workdir else tempfile.TemporaryDirectory(prefix="bench_recaption_")
    root = a.workdir or tmp.name
    os.makedirs(root, exist_ok=True)
    n_input = max(a.images, a.per_image_n, a.batch)
    t = time.perf_counter()
    make_input(os.path.join(root, "input.array_record"), n_input)
    log(f"rendered {n_input} world images into {root}/input.array_record in {time.perf_counter() - t:.1f}s")
    params = make_captioner_run(os.path.join(root, "dsc_run"), a.max_len)
    log(f"DSC captioner: {params:,} parameters (random init); devices: {jax.local_devices()}")

    log(f"warm-up jobs (compile the batch-{a.batch} and batch-1 programs)")
    run_job(a, root, "warmup_batched", a.batch, a.batch)
    run_job(a, root, "warmup_single", 2, 1)
    log(f"timed job: {a.images} images, batch {a.batch}")
    batched = run_job(a, root, "batched", a.images, a.batch)
    log(f"  {batched['images_per_s']:.1f} images/s; one at a time on {a.per_image_n} images")
    single = run_job(a, root, "single", a.per_image_n, 1)
    log(f"  {single['images_per_s']:.2f} images/s")
    shares = batched["time_shares"]
    result = {
        "images_per_s": batched["images_per_s"],
        "speedup_vs_per_image": batched["images_per_s"] / single["images_per_s"],
        "per_image_images_per_s": single["images_per_s"],
        "time_shares": {"decoding": shares["decode"], "image_decode": shares["image"],
                        "writing": shares["write"], "other": shares["other"]},
        "per_image_time_shares": single["time_shares"],
        "images": a.images,
        "per_image_images": a.per_image_n,
        "tokens_per_caption": a.max_len if not a.allow_eos else None,  # None: ends at eos, not counted
        "loop_seconds": a.images / batched["images_per_s"],
        "params": params,
        "devices": jax.local_device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_start": load,
        "settings": {k: v for k, v in vars(a).items() if k not in ("json", "workdir")},
        "model": "configs/captioner_descriptive.py default size (CoCa tiny, 3-conv stem, vocab 1024), random init",
        "forced_full_length": not a.allow_eos,
    }
    if tmp is not None:
        tmp.cleanup()
    common.report(result, a.json)
    return result


if __name__ == "__main__":
    main()
