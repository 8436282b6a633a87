"""Cached text-encoder states (diffusion/text_cache.py): a frozen pretrained T5's states computed
once by the cache job give the loss of on-the-fly encoding, guidance dropout included; caches made
for other settings and runs with a trainable encoder are refused."""

import os
import types

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_weights_t5 import EOS, PAD, _save_tokenizer  # noqa: E402

from dalle3_jax import configlib, sharding, trainers  # noqa: E402
from dalle3_jax.diffusion import latent_cache, text_cache  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(t5_dir, variant="tiny,caption=descriptive_gt,blend=0.5"):
    c = configlib.load_config_file(os.path.join(ROOT, "configs", f"t2i.py:{variant}"))
    c.model.text_pretrained = t5_dir
    c.diffusion.cond_drop = 0.5  # about half of the batch's captions are dropped
    return c


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A small random T5 encoder (with its tokenizer.json), 16 world records at 32 px as ArrayRecord
    shards, and their text-state cache for descriptive/alt blending: (t5 dir, records, cache)."""
    from dalle3_jax.data.sources import ArrayRecordShardWriter
    from dalle3_jax.data.world import WorldConfig, WorldSource

    root = tmp_path_factory.mktemp("text_cache")
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                                relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD)
    t5_dir = str(root / "t5")
    transformers.T5EncoderModel(cfg).eval().save_pretrained(t5_dir, safe_serialization=True)
    _save_tokenizer(t5_dir)
    world = WorldSource("train", WorldConfig(image_size=32, single_object=True))
    with ArrayRecordShardWriter(str(root / "records" / "world-00000-of-00001.array_record")) as w:
        for i in range(16):
            w.write(world[i])
    config = _config(t5_dir)
    config.data.source, config.data.arrayrecord_pattern = "arrayrecord", str(root / "records")
    manifest = latent_cache.precompute(config, str(root / "cache"), batch_size=8, text_states=True)
    assert (manifest["inputs"], manifest["written"]) == (16, 16)
    return t5_dir, str(root / "records"), str(root / "cache")


def test_cached_states_give_the_loss_of_the_encoder(cache):
    from dalle3_jax.data import blend as blend_lib
    from dalle3_jax.data import sources
    from dalle3_jax.trainers import t2i

    t5_dir, records_dir, cache_dir = cache
    plain = _config(t5_dir)
    plain.data.source, plain.data.arrayrecord_pattern = "arrayrecord", records_dir
    cached = _config(t5_dir, f"tiny,caption=descriptive_gt,blend=0.5,text_states={cache_dir}")
    assert (cached.data.arrayrecord_pattern, cached.cached_text_states) == (cache_dir, True)
    mesh = sharding.make_mesh(plain.mesh)
    with jax.set_mesh(mesh):
        tasks = [trainers.build_task(c, "/tmp/unused") for c in (plain, cached)]
        model = sharding.create_sharded(lambda: t2i.make_model(plain), mesh)
        tasks[0].init_weights(types.SimpleNamespace(model=model, extra=None))  # the checkpoint's T5 weights
        # The UNet's output layer starts at zero, which would hide the text from the loss.
        kernel = model.unet.conv_out.kernel
        kernel[...] = jax.device_put(0.1 * jax.random.normal(jax.random.key(1), kernel.shape), kernel[...].sharding)
        batches = []
        for task in tasks:
            host = next(iter(task.train_data()))
            batches.append(sharding.global_batch({k: host[k] for k in task.batch_keys}, mesh))
        rng = jax.random.key(3)
        losses = [float(jax.jit(lambda m, b, t=t: t.loss_fn(m, b, rng)[0])(model, b))
                  for t, b in zip(tasks, batches)]
    assert set(batches[1]) == {"image", "tokens", "text_states", "text_mask", "text_pooled"}
    assert batches[1]["text_states"].shape == (16, plain.input.max_text_len, 32)
    np.testing.assert_array_equal(np.asarray(batches[0]["tokens"]), np.asarray(batches[1]["tokens"]))
    # The batch (all 16 records) holds both blended captions, and this rng drops some of them.
    source = sources.make_source(plain.data)
    blend = blend_lib.from_choice(plain.caption, plain.blend, plain.blend_seed)
    assert text_cache.fields(plain) == ("descriptive", "alt")
    assert {blend.name(source[i], i) for i in range(16)} == {"descriptive", "alt"}
    drop = np.asarray(jax.random.bernoulli(jax.random.split(rng)[0], 0.5, (16,)))
    assert 0 < drop.sum() < 16
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_refuses_caches_of_other_settings_and_trainable_encoders(cache, tmp_path):
    from dalle3_jax.recaption.writer import JobMismatch

    t5_dir, records_dir, cache_dir = cache
    variant = f"tiny,caption=descriptive_gt,blend=0.5,text_states={cache_dir}"
    run = _config(t5_dir, variant)
    run.input.max_text_len = 24
    with pytest.raises(ValueError, match="made with max_text_len=32, this run uses 24"):
        trainers.build_task(run, str(tmp_path))
    run = _config(t5_dir, f"tiny,caption=dsc,records={records_dir},text_states={cache_dir}")
    with pytest.raises(ValueError, match=r"can pick \['dsc'\]"):
        trainers.build_task(run, str(tmp_path))
    scratch = _config("", variant)  # the scratch encoder trains: its states would go stale
    with pytest.raises(ValueError, match="from scratch"):
        trainers.build_task(scratch, str(tmp_path))
    other = _config(t5_dir)
    other.data.source, other.data.arrayrecord_pattern = "arrayrecord", records_dir
    other.input.max_text_len = 24
    with pytest.raises(JobMismatch, match="text.max_text_len"):
        latent_cache.precompute(other, cache_dir, batch_size=8, text_states=True)
    nothing = _config(t5_dir)
    with pytest.raises(ValueError, match="nothing to cache"):
        latent_cache.precompute(nothing, str(tmp_path / "empty"))
