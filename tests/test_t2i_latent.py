"""Latent diffusion in the T2I stage: 128 px world images through a frozen autoencoder (diffusion/latent.py)."""

import os
import sys

import numpy as np
import pytest

from dalle3_jax import configlib, trainers
from dalle3_jax.diffusion import latent
from dalle3_jax.trainers import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))


def _config(variant="tiny,image_size=128,autoencoder=tiny"):
    c = configlib.load_config_file(os.path.join(ROOT, "configs", f"t2i.py:{variant}"))
    # Small evaluations: the point is that each path runs at 128 px, not what it scores.
    c.total_steps, c.log_every, c.checkpoint_every = 2, 1, 2
    c.eval.n_val = c.eval.n_grid = 8
    c.eval.n_prompts = 0  # prompt following samples through the same sample_captions as the grid
    return c


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A small random diffusers AutoencoderKL saved with save_pretrained: f = 4 and 4 latent
    channels, like the registry's tiny variant, so 128 px images become 32 x 32 x 4 latents."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                        sample_size=128, scaling_factor=0.5)
    path = str(tmp_path_factory.mktemp("vae"))
    vae.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory, vae_dir):
    """Two steps of configs/t2i.py:tiny,image_size=128,autoencoder=<the imported diffusers VAE>,
    checkpointed, with its end-of-run evaluation (validation loss on latents, decoded grid)."""
    workdir = str(tmp_path_factory.mktemp("t2i_latent"))
    config = _config(f"tiny,image_size=128,autoencoder={vae_dir}")
    assert (config.autoencoder.pretrained, config.model.unet.in_channels) == (vae_dir, 4)
    return workdir, loop.train_and_evaluate(config, workdir, trainers.build_task(config, workdir))


def test_config_variant_sets_the_latent_unet():
    c = _config()
    assert (c.autoencoder.variant, c.autoencoder.pretrained) == ("tiny", "")
    assert (c.input.image_size, c.data.world.image_size) == (128, 128)
    assert (c.model.unet.image_size, c.model.unet.in_channels, c.sample.clip_x0) == (32, 4, False)
    pixel = _config("tiny")
    assert latent.settings(pixel) is None and latent.batch_keys(pixel) == ("image", "tokens")
    assert latent.prepare_batch(pixel) is None and pixel.model.unet.in_channels == 3


def test_config_errors_name_the_fix(tmp_path):
    c = _config("tiny,image_size=128")
    c.autoencoder.variant = "tiny"  # set after the config file: the UNet still expects 128 px RGB
    with pytest.raises(ValueError, match="model.unet.image_size=32 --config.model.unet.in_channels=4"):
        trainers.build_task(c, str(tmp_path))
    c = _config()
    c.sample.clip_x0 = True
    with pytest.raises(ValueError, match="clip_x0"):
        trainers.build_task(c, str(tmp_path))
    c = _config()
    c.autoencoder.pretrained = str(tmp_path)
    with pytest.raises(ValueError, match="both set"):
        trainers.build_task(c, str(tmp_path))
    c.autoencoder.variant = ""
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        trainers.build_task(c, str(tmp_path))


def test_latent_run_trains_evaluates_and_checkpoints(latent_run):
    workdir, result = latent_run
    assert result["step"] == 2
    assert np.isfinite(result["val_loss"])
    from PIL import Image

    grid = np.asarray(Image.open(os.path.join(workdir, "samples", "step_000002.png")))
    assert grid.shape == (3 * 130 + 2, 3 * 130 + 2, 3)  # 8 decoded 128 px samples, 3 per row


def test_sample_cli_decodes_to_pixels(latent_run, tmp_path):
    import sample

    workdir, _ = latent_run
    out = str(tmp_path / "grid.png")
    assert sample.main(["--workdir", workdir, "--prompt", "a small red circle at the top left", "--n", "2",
                        "--out", out]) == 0
    from PIL import Image

    grid = np.asarray(Image.open(out))
    assert grid.dtype == np.uint8 and grid.shape == (130 + 2, 2 * 130 + 2, 3)


# ------------------------------------------------------------------------------------------ cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """16 world records at 128 px as ArrayRecord shards, and their latent cache (registry tiny
    autoencoder, random weights, posterior mean) in 2 shards: (config, records dir, cache dir)."""
    from dalle3_jax.data.sources import ArrayRecordShardWriter
    from dalle3_jax.data.world import WorldConfig, WorldSource
    from dalle3_jax.diffusion import latent_cache

    root = tmp_path_factory.mktemp("cache")
    world = WorldSource("train", WorldConfig(image_size=128, single_object=True))
    with ArrayRecordShardWriter(str(root / "records" / "world-00000-of-00001.array_record")) as w:
        for i in range(16):
            w.write(world[i])
    config = _config()
    config.data.source, config.data.arrayrecord_pattern = "arrayrecord", str(root / "records")
    manifest = latent_cache.precompute(config, str(root / "latents"), num_shards=2, batch_size=16)
    assert (manifest["inputs"], manifest["written"], manifest["failed"]) == (16, 16, 0)
    return config, str(root / "records"), str(root / "latents")


def test_cache_gives_the_loss_of_on_the_fly_encoding(cache):
    import jax

    from dalle3_jax import sharding
    from dalle3_jax.trainers import t2i

    config, _, latents = cache
    cached = _config(f"tiny,image_size=128,autoencoder=tiny,latents={latents}")
    assert (cached.data.source, cached.autoencoder.use_cached) == ("arrayrecord", True)
    mesh = sharding.make_mesh(config.mesh)
    model = sharding.create_sharded(lambda: t2i.make_model(config), mesh)
    batches, tasks = [], []
    with jax.set_mesh(mesh):
        for c in (config, cached):
            task = trainers.build_task(c, "/tmp/unused")
            host = next(iter(task.train_data()))
            assert ("image" in host) != ("latent" in host)  # the cache is read instead of the images
            batches.append(task.prepare_batch(sharding.global_batch({k: host[k] for k in task.batch_keys}, mesh)))
            tasks.append(task)
        # Both tasks' losses read batch["latent"]: one compiled loss serves the two batches.
        loss_fn = jax.jit(lambda m, b: tasks[0].loss_fn(m, b, jax.random.key(0))[0])
        loss = [float(loss_fn(model, b)) for b in batches]
    assert batches[1]["latent"].shape == (16, 32, 32, 4)
    np.testing.assert_array_equal(np.asarray(batches[0]["tokens"]), np.asarray(batches[1]["tokens"]))
    np.testing.assert_allclose(np.asarray(batches[1]["latent"]), np.asarray(batches[0]["latent"]), atol=1e-6)
    assert loss[0] == pytest.approx(loss[1], abs=1e-6)


def test_cache_resumes_and_refuses_other_settings(cache, tmp_path):
    from dalle3_jax.data import records
    from dalle3_jax.diffusion import latent_cache
    from dalle3_jax.recaption.writer import JobMismatch

    config, _, latents = cache
    again = latent_cache.precompute(config, latents, num_shards=2, batch_size=16)  # every shard committed
    assert again["written"] == 16 and sorted(os.listdir(latents)).count("latents-00001-of-00002.array_record") == 1
    other = _config()
    other.data.update(source="arrayrecord", arrayrecord_pattern=config.data.arrayrecord_pattern)
    other.autoencoder.seed = 1
    with pytest.raises(JobMismatch, match="autoencoder.seed"):
        latent_cache.precompute(other, latents, num_shards=2, batch_size=16)
    run = _config(f"tiny,image_size=128,autoencoder=tiny,latents={latents}")
    run.autoencoder.seed = 1
    with pytest.raises(ValueError, match="latent cache .* was made with autoencoder"):
        trainers.build_task(run, str(tmp_path))
    field = records.encode_array(np.arange(6, dtype=np.float16).reshape(2, 3))
    np.testing.assert_array_equal(records.decode_array(field), np.arange(6).reshape(2, 3))
    with pytest.raises(records.RecordError, match="do not hold"):
        records.decode_array({**field, "shape": [4, 3]})


def test_variant_weights_from_a_run_checkpoint_and_fixed_posterior_samples(tmp_path):
    # An autoencoder run (trainers/autoencoder.py) saves the model under `model`, like every run.
    import jax
    from flax import nnx

    from dalle3_jax import checkpoint, sharding
    from dalle3_jax.models import autoencoder_kl

    trained = autoencoder_kl.create(autoencoder_kl.config("tiny"), rngs=nnx.Rngs(7))
    with checkpoint.Checkpointer(str(tmp_path / "ae" / "checkpoints")) as ckpt:
        ckpt.save(3, {"model": nnx.state(trained)}, force=True)
    ae = _config().autoencoder
    ae.checkpoint = f"{tmp_path / 'ae'}:3"
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
    loaded = latent.build(ae, mesh)
    for got, want in zip(jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(nnx.state(trained))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # Posterior samples are fixed per example: the same latent in any batch position.
    ae.sample = True
    images = np.random.default_rng(0).uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)
    sampler = latent.Autoencoder(loaded, ae, mesh)
    z = sampler.encode_host(images, np.arange(8), 8)
    order = np.arange(8)[::-1]
    np.testing.assert_allclose(sampler.encode_host(images[order], order, 8), z[order], atol=1e-6)
    mean = latent.Autoencoder(loaded, _config().autoencoder, mesh).encode_host(images, np.arange(8), 8)
    assert z.shape == (8, 4, 4, 4) and 0 < np.abs(z - mean).max() < 1e3
