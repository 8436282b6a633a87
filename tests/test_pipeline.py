"""Tests for the Grain input pipeline (dalle3_jax/data/pipeline.py)."""

import io

import grain
import jax
import numpy as np
import pytest
from etils import epath
from PIL import Image

from dalle3_jax import sharding
from dalle3_jax.data import pipeline
from dalle3_jax.data import tokenizer as tokenizer_lib

MAX_LEN = 24


class StubSource:
    """Records shaped like the world's, with images that vary in size and shape per index.

    Examples whose index is in `bad` carry bytes that are not an image.
    """

    def __init__(self, n, bad=(), size=(20, 28)):
        self.n, self.bad, self.size = n, set(bad), size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        h, w = self.size
        img = np.full((h + i % 3, w - i % 5, 3), i % 256, dtype=np.uint8)
        image = b"not an image at all" if i in self.bad else img
        return {"id": f"stub-{i}", "image": image, "captions": {"alt": f"a red square {i}", "short": "red"}}


class ListSource:
    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.Tokenize(tokenizer_lib.load_tokenizer())


def loader(source, tok, **kw):
    args = dict(global_batch_size=8, image_size=16, tokenizer=tok, max_text_len=MAX_LEN, seed=0,
                process_index=0, process_count=1, read_threads=2)
    args.update(kw)
    return pipeline.make_loader(source, **args)


def indices(batches):
    return np.concatenate([b["index"] for b in batches])


def test_world_batch_shapes_dtypes_ranges(tok):
    from dalle3_jax.data.world import WorldConfig, WorldSource

    source = WorldSource("finetune", WorldConfig(seed=0, image_size=64))
    it = iter(loader(source, tok, global_batch_size=4, image_size=32, caption_field="descriptive",
                     max_text_len=96, keep_text=True))
    b = next(it)
    assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
    assert -1.0 <= b["image"].min() < b["image"].max() <= 1.0
    assert b["tokens"].shape == (4, 96) and b["tokens"].dtype == np.int32
    assert b["text_len"].dtype == np.int32 and b["index"].dtype == np.int64
    assert (b["tokens"][:, 0] == tokenizer_lib.BOS_ID).all()
    for row, n in zip(b["tokens"], b["text_len"]):
        assert row[n - 1] == tokenizer_lib.EOS_ID and (row[n:] == tokenizer_lib.PAD_ID).all()
    for i, text, row, n, image in zip(b["index"], b["caption"], b["tokens"], b["text_len"], b["image"]):
        record = source[int(i)]
        assert text == record["captions"]["descriptive"]
        assert n < 96 and tok.decode(row) == text  # descriptive captions fit in 96 tokens
        want = pipeline.resize_square(record["image"], 32).astype(np.float32) / 127.5 - 1
        np.testing.assert_allclose(image, want, atol=1e-6)


def test_same_seed_same_batches_other_seed_other_order(tok):
    src = StubSource(64)
    a = [next(it) for it in [iter(loader(src, tok))] for _ in range(3)]
    b = [next(it) for it in [iter(loader(src, tok))] for _ in range(3)]
    c = [next(it) for it in [iter(loader(src, tok, seed=1))] for _ in range(3)]
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(indices(a), indices(c))
    unshuffled = next(iter(loader(src, tok, shuffle=False)))
    np.testing.assert_array_equal(unshuffled["index"], np.arange(8))


def test_process_shards_are_disjoint_and_cover_the_data(tok):
    src = StubSource(68)  # 68 = 2 x 34: each process gets 34, 4 batches of 8 and 2 dropped
    seen = []
    for p in range(2):
        batches = list(loader(src, tok, global_batch_size=16, process_index=p, process_count=2, num_epochs=1,
                              drop_remainder=False))
        assert all(b["index"].shape[0] <= 8 for b in batches)
        seen.append(indices(batches))
    assert len(seen[0]) == len(seen[1]) == 34
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(range(68))
    # 69 records, 3 epochs: the processes split one global stream in which each epoch is a fresh
    # permutation of all records; 12 whole global batches, then the last 15 positions split 7 + 7.
    def stream(p, count):
        return indices(list(loader(StubSource(69), tok, global_batch_size=16, process_index=p, process_count=count,
                                   num_epochs=3, drop_remainder=False))).tolist()

    halves = [stream(p, 2) for p in range(2)]
    assert len(halves[0]) == len(halves[1]) == 12 * 8 + 7
    merged = [i for k in range(12) for half in halves for i in half[8 * k:8 * k + 8]]
    assert merged + halves[0][96:] + halves[1][96:] == stream(0, 1)[:206]
    with pytest.raises(ValueError, match="divisible"):
        loader(src, tok, global_batch_size=9, process_count=2)


def test_epochs_each_example_once_per_epoch_reshuffled(tok):
    src = StubSource(32)
    idx = indices(list(loader(src, tok, num_epochs=2)))
    assert len(idx) == 64
    first, second = idx[:32], idx[32:]
    assert sorted(first) == sorted(second) == list(range(32))
    assert not np.array_equal(first, second)
    forever = iter(loader(src, tok, num_epochs=None))
    assert len(indices([next(forever) for _ in range(10)])) == 80  # past the 32 records


def test_state_restores_exact_next_batch(tok, tmp_path):
    src = StubSource(64)
    ds = loader(src, tok, keep_text=True)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    fresh = iter(ds)
    fresh.set_state(state)
    # And through the Orbax handler the trainers use (JSON state on disk).
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(fresh))
    restored = handler.restore(epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(iter(ds)))
    for got_it in (fresh, restored):
        for want in expected:
            got = next(got_it)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])


def test_state_restores_with_worker_processes(tok):
    src = StubSource(96)
    ds = loader(src, tok, worker_count=2, worker_buffer_size=1)
    it = iter(ds)
    try:
        first = [next(it) for _ in range(3)]
        state = it.get_state()
        expected = next(it)
    finally:
        it.close()
    # Workers change the interleaving of batches, not their content or determinism.
    single = indices(list(loader(src, tok, num_epochs=1)))
    assert sorted(indices(first + [expected])) == sorted(single[:32])
    again = iter(ds)
    try:
        again.set_state(state)
        got = next(again)
    finally:
        again.close()
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])


def test_non_square_and_odd_images_resized(tok):
    # A wide image: green centre square, red side bands that the centre crop must remove.
    wide = np.zeros((30, 50, 3), np.uint8)
    wide[:, :10] = wide[:, 40:] = (255, 0, 0)
    wide[:, 10:40] = (0, 255, 0)
    tall_png = io.BytesIO()
    Image.fromarray(np.full((9, 5, 3), (0, 0, 255), np.uint8)).save(tall_png, format="PNG")
    gray = np.full((7, 7), 255, np.uint8)
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 3] = 255
    records = [{"id": str(i), "image": im, "captions": {"alt": "x"}}
               for i, im in enumerate([wide, tall_png.getvalue(), gray, rgba])]
    b = next(iter(loader(ListSource(records), tok, global_batch_size=4, shuffle=False)))
    img = (b["image"] + 1) * 127.5
    assert b["image"].shape == (4, 16, 16, 3)
    np.testing.assert_allclose(img[0], np.broadcast_to([0, 255, 0], (16, 16, 3)), atol=1)
    np.testing.assert_allclose(img[1], np.broadcast_to([0, 0, 255], (16, 16, 3)), atol=1)  # upsampled
    np.testing.assert_allclose(img[2], 255, atol=1)
    np.testing.assert_allclose(img[3], 0, atol=1)


def test_resize_square_antialiases_downsampling():
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    small = pipeline.resize_square(np.repeat(checker[..., None], 3, 2), 8)
    # Averaged (antialiased), a 1-pixel checkerboard is mid grey; nearest would keep 0/255.
    assert small.shape == (8, 8, 3) and np.abs(small.astype(int) - 127).max() < 10


def test_bad_images_are_skipped_and_counted(tok, caplog):
    bad = {3, 10, 11, 40}
    src = StubSource(48, bad=bad)
    batches = list(loader(src, tok, num_epochs=1, drop_remainder=False))
    idx = indices(batches)
    assert sorted(idx) == sorted(set(range(48)) - bad)
    assert sum(int(b["skipped"].sum()) for b in batches) == len(bad)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert all(f"skipping record stub-{i} " in logged for i in bad)
    with pytest.raises(ValueError, match=r"record stub-\d+ \(source index \d+\): bad image"):
        list(loader(src, tok, num_epochs=1, on_bad_image="raise"))
    with pytest.raises(RuntimeError, match="broken"):
        list(loader(StubSource(16, bad=range(16)), tok, num_epochs=1, max_consecutive_bad=5))


def test_caption_field_callable_and_missing_field(tok):
    src = StubSource(16)

    def blend(record, index):  # the per-example caption blending hook
        return record["captions"]["short"] if index % 2 else record["captions"]["alt"]

    b = next(iter(loader(src, tok, caption_field=blend, keep_text=True)))
    for i, text in zip(b["index"], b["caption"]):
        assert text == ("red" if i % 2 else f"a red square {i}")
    with pytest.raises(KeyError, match="descriptive"):
        next(iter(loader(src, tok, caption_field="descriptive")))


def test_config_and_device_batches_on_8_devices(tok):
    cfg = pipeline.default_input_config()
    cfg.global_batch_size, cfg.image_size, cfg.max_text_len, cfg.read_threads = 16, 8, 12, 2
    ds = pipeline.make_loader_from_config(StubSource(40), cfg, tokenizer=tok)
    mesh = sharding.make_mesh({"data": -1}, devices=jax.devices()[:8])
    batch = next(pipeline.to_device_batches(iter(ds), mesh))
    assert set(batch) == set(pipeline.DEVICE_KEYS)
    assert batch["image"].shape == (16, 8, 8, 3) and batch["tokens"].shape == (16, 12)
    assert len(batch["tokens"].sharding.device_set) == 8
    assert batch["tokens"].addressable_shards[0].data.shape == (2, 12)
    with pytest.raises(ValueError, match="unknown input config"):
        bad = pipeline.default_input_config()
        bad.unlock()
        bad.batch = 3
        pipeline.make_loader_from_config(StubSource(40), bad, tokenizer=tok)
    assert pipeline.steps_per_epoch(40, 16) == 2
