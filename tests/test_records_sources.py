"""Record schema, image/caption normalisation, and the ArrayRecord / TFDS sources."""

import io
import os
import pickle
import struct
import zlib

import ml_collections
import msgpack
import numpy as np
import pytest
from PIL import Image

from dalle3_jax.data import records as R
from dalle3_jax.data.sources import (ArrayRecordShardWriter, ArrayRecordSource, ShardWriter, TfdsSource,
                                     default_data_config, make_source)


def encoded(arr_or_img, fmt="PNG", **kw) -> bytes:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16_rgb(a: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (PIL cannot write one)."""
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")


def rand_rgb(h=20, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- records


def test_record_round_trip_and_array_image():
    img = rand_rgb()
    rec = {"id": "a1", "image": R.encode_image(img), "captions": {"alt": "a cat", "dsc": "a grey cat"},
           "scene": '{"objects": []}', "meta": {"w": np.int64(30), "url": "http://x", "tags": ["a", 1]}}
    back = R.decode_record(R.encode_record(rec))
    assert back["id"] == "a1" and back["captions"] == rec["captions"] and back["scene"] == rec["scene"]
    assert back["meta"] == {"w": 30, "url": "http://x", "tags": ["a", 1]}
    np.testing.assert_array_equal(R.decode_image(back["image"]), img)
    # An array image (synthetic world) is stored as lossless PNG.
    back = R.decode_record(R.encode_record({"id": "w", "image": img, "captions": {"alt": "x"}}))
    assert back["image"][:8] == b"\x89PNG\r\n\x1a\n" and "scene" not in back
    np.testing.assert_array_equal(R.decode_image(back["image"]), img)


@pytest.mark.parametrize("bad, words", [
    ({"image": b"x", "captions": {"a": "b"}}, "missing field"),
    ({"id": "", "image": b"x", "captions": {"a": "b"}}, "'id'"),
    ({"id": "i", "image": "notbytes", "captions": {"a": "b"}}, "'image'"),
    ({"id": "i", "image": b"x", "captions": {}}, "'captions'"),
    ({"id": "i", "image": b"x", "captions": {"a": 3}}, "caption 'a'"),
    ({"id": "i", "image": b"x", "captions": {"a": "b"}, "extra": 1}, "unknown field"),
    ({"id": "i", "image": b"x", "captions": {"a": "b"}, "scene": "{not json"}, "not JSON"),
    ({"id": "i", "image": b"x", "captions": {"a": "b"}, "meta": {"o": object()}}, "serialised"),
])
def test_encode_record_rejects_bad_records(bad, words):
    with pytest.raises(R.RecordError, match=words):
        R.encode_record(bad)


def test_decode_record_validates():
    with pytest.raises(R.RecordError, match="not a msgpack record|expected a map"):
        R.decode_record(b"\xc1garbage")
    with pytest.raises(R.RecordError, match="schema version"):
        R.decode_record(msgpack.packb({"v": 99, "id": "i", "image": b"x", "captions": {"a": "b"}}))
    with pytest.raises(R.RecordError, match="'image'"):
        R.decode_record(msgpack.packb({"v": 1, "id": "i", "image": "s", "captions": {"a": "b"}}))


# ----------------------------------------------------------------------------- images


def test_encode_decode_image():
    img = rand_rgb()
    np.testing.assert_array_equal(R.decode_image(R.encode_image(img)), img)
    jpg = R.decode_image(R.encode_image(img, "jpeg"))
    assert jpg.shape == img.shape and jpg.dtype == np.uint8
    assert R.decode_image(img) is img  # already decoded: passed through
    grey = R.decode_image(img[..., 0])
    assert grey.shape == (20, 30, 3) and (grey[..., 2] == img[..., 0]).all()


def test_normalise_modes():
    grey = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30)
    arr, why = R.normalise_image(encoded(grey))
    assert why == ["grayscale"] and arr.shape == (20, 30, 3) and (arr[..., 1] == grey).all()

    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[:10] = (255, 0, 0, 255)  # opaque red on top, fully transparent below
    arr, why = R.normalise_image(encoded(rgba))
    assert why == ["alpha_composited"]
    assert (arr[0, 0] == (255, 0, 0)).all() and (arr[15, 0] == (255, 255, 255)).all()

    la = np.stack([grey, np.full_like(grey, 0)], -1)
    arr, why = R.normalise_image(encoded(Image.fromarray(la, "LA")))
    assert set(why) == {"grayscale", "alpha_composited"} and (arr == 255).all()

    pal = Image.new("P", (20, 20), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(0, (0, 0, 10, 20))
    arr, why = R.normalise_image(encoded(pal, transparency=0))
    assert "alpha_composited" in why and (arr[0, 0] == 255).all() and (arr[0, 15] == (0, 0, 255)).all()

    g16 = np.full((20, 20), 0xAB12, np.uint16)
    arr, why = R.normalise_image(encoded(Image.fromarray(g16)))
    assert set(why) == {"16bit", "grayscale"} and (arr == 0xAB).all()

    c16 = np.zeros((20, 24, 3), np.uint16)
    c16[..., 0], c16[..., 2] = 0xFF00, 0x1234
    arr, why = R.normalise_image(png16_rgb(c16))
    assert why == ["16bit"] and (arr[..., 0] == 0xFF).all() and (arr[..., 2] == 0x12).all()

    cmyk = Image.new("CMYK", (24, 20), (0, 255, 255, 0))  # pure red in CMYK
    arr, why = R.normalise_image(encoded(cmyk, "JPEG", quality=100))
    assert why == ["cmyk"] and abs(int(arr[5, 5, 0]) - 255) < 8 and arr[5, 5, 1] < 8


def test_normalise_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20] = 255  # left half white
    arr, why = R.normalise_image(encoded(img, "JPEG", exif=exif, quality=100))
    assert why == ["exif_rotated"] and arr.shape == (40, 20, 3)
    assert arr[5, 10].mean() > 200 and arr[35, 10].mean() < 50  # the white half is now on top


def test_normalise_rejects_broken_and_tiny():
    good_png, good_jpg = encoded(rand_rgb(64, 64)), encoded(rand_rgb(64, 64), "JPEG")
    for data in (good_png[: len(good_png) // 2], good_jpg[: len(good_jpg) // 2]):
        with pytest.raises(R.RecordError) as e:
            R.normalise_image(data)
        assert e.value.reason in ("truncated_image", "corrupt_image")
    with pytest.raises(R.RecordError) as e:
        R.normalise_image(b"this is not an image at all")
    assert e.value.reason == "corrupt_image"
    with pytest.raises(R.RecordError) as e:
        R.normalise_image(encoded(np.zeros((1, 1, 3), np.uint8)))
    assert e.value.reason == "image_too_small" and "1x1" in str(e.value)
    with pytest.raises(R.RecordError, match="image_too_small"):
        R.normalise_image(np.zeros((8, 100, 3), np.uint8))


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_normalise_huge_images(monkeypatch):
    # 10000x10000 (over PIL's bomb warning threshold) is downscaled, cheaply, via JPEG draft:
    # the decoder already delivers 1/8 size, so the resize starts from 1250x1250.
    big = encoded(Image.new("RGB", (10000, 10000), (10, 200, 30)), "JPEG", quality=50)
    resized_from, real_resize = [], Image.Image.resize

    def spy(self, *args, **kwargs):
        resized_from.append(self.size)
        return real_resize(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    arr, why = R.normalise_image(big)
    assert resized_from == [(1250, 1250)]
    assert arr.shape == (1024, 1024, 3) and why == ["downscaled"] and abs(int(arr[500, 500, 1]) - 200) < 6
    arr, why = R.normalise_image(encoded(rand_rgb(300, 3000)), max_side=1024)
    assert arr.shape == (102, 1024, 3) and why == ["downscaled"]
    # A header claiming 20000x20000 is a decompression bomb: rejected before decoding.
    bomb = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 100)) + png_chunk(b"IEND", b""))
    with pytest.raises(R.RecordError) as e:
        R.normalise_image(bomb)
    assert e.value.reason == "image_too_large"


def test_normalise_image_bytes_keeps_clean_bytes():
    png = encoded(rand_rgb())
    out, why, hw = R.normalise_image_bytes(png)
    assert out is png and why == [] and hw == (20, 30)
    out, why, _ = R.normalise_image_bytes(encoded(rand_rgb(), "WEBP", lossless=True))
    assert why == ["reencoded_webp"] and R.image_format(out) == "jpeg"
    out, why, _ = R.normalise_image_bytes(encoded(rand_rgb()[..., 0]))
    assert why == ["grayscale"] and R.image_format(out) == "png"


# ----------------------------------------------------------------------------- captions


def test_normalise_caption():
    assert R.normalise_caption("a red  cube\n") == ("a red cube", ["whitespace"])
    assert R.normalise_caption("plain") == ("plain", [])
    assert R.normalise_caption("caf\u00e9".encode()) == ("caf\u00e9", [])
    assert R.normalise_caption(b"caf\xe9 \x93quoted\x94") == ("caf\u00e9 \u201cquoted\u201d", ["non_utf8_caption"])
    assert R.normalise_caption("a\x00b\x1bc\u200bd e") == ("abcd e", ["control_chars"])
    for empty in ("", "  \n\t", "\x00\x01"):
        with pytest.raises(R.RecordError) as e:
            R.normalise_caption(empty)
        assert e.value.reason == "empty_caption"
    with pytest.raises(R.RecordError) as e:
        R.normalise_caption(None)
    assert e.value.reason == "missing_caption"
    long = " ".join(["words"] * 25000)  # 150 kB; 2000 is not a multiple of 6, so a hard cut splits a word
    text, why = R.normalise_caption(long, max_chars=2000)
    assert why == ["caption_truncated"] and text.endswith(" words") and 1990 < len(text) <= 2000
    text, why = R.normalise_caption("x" * 5000, max_chars=100)  # one giant word: hard cut
    assert text == "x" * 100 and why == ["caption_truncated"]


# ----------------------------------------------------------------------------- ArrayRecord


def _records(n, start=0):
    return [{"id": f"r{i}", "image": R.encode_image(rand_rgb(16, 16, i)), "captions": {"alt": f"caption {i}"},
             "meta": {"i": i}} for i in range(start, start + n)]


def test_arrayrecord_source(tmp_path):
    recs = _records(7)
    with ShardWriter(tmp_path / "s-00000.array_record") as w:
        for r in recs[:4]:
            w.write(r)
    with ArrayRecordShardWriter(str(tmp_path / "s-00001.array_record")) as w:
        for r in recs[4:]:
            w.write(r)
    assert sorted(os.listdir(tmp_path)) == ["s-00000.array_record", "s-00001.array_record"]  # no temp left
    for spec in (str(tmp_path / "s-*.array_record"), str(tmp_path),
                 [tmp_path / "s-00000.array_record", tmp_path / "s-00001.array_record"]):
        src = ArrayRecordSource(spec)
        assert len(src) == 7
        assert [src[i] for i in range(7)] == recs
    assert src[-1] == recs[-1] and src.__getitems__([5, 1]) == [recs[5], recs[1]]
    for bad in (7, -8):
        with pytest.raises(IndexError):
            src[bad]
    clone = pickle.loads(pickle.dumps(src))
    assert clone[3] == recs[3] and len(clone) == 7


def test_shard_writer_aborts_on_error(tmp_path):
    path = tmp_path / "x.array_record"
    with pytest.raises(RuntimeError):
        with ShardWriter(path) as w:
            w.write(_records(1)[0])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(R.RecordError):
        with ShardWriter(path) as w:
            w.write({"id": "x"})
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- TFDS

tfds = pytest.importorskip("tensorflow_datasets")


class Dalle3JaxTinyCaptions(tfds.core.GeneratorBasedBuilder):
    """A tiny COCO-like dataset, built locally without TensorFlow.

    Images are given to tfds.features.Image as already-encoded PNG bytes: TFDS stores them as
    they are (encoding from a numpy array would need TensorFlow). A second copy is kept in a
    plain bytes Tensor feature, the fallback layout some datasets use.
    """

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        f = tfds.features
        return tfds.core.DatasetInfo(builder=self, features=f.FeaturesDict({
            "image": f.Image(shape=(None, None, 3)),
            "grey": f.Image(shape=(None, None, 1)),
            "raw": f.Tensor(shape=(), dtype=np.object_),
            "captions": {"text": f.Sequence(f.Text())},
            "image_id": f.Scalar(dtype=np.int64),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(5), "validation": self._generate_examples(2)}

    def _generate_examples(self, n):
        for i in range(n):
            png = R.encode_image(rand_rgb(18, 20, i))
            caps = [f"photo {i}", f"second caption {i}"] if i != 3 else []
            yield i, {"image": png, "grey": R.encode_image(rand_rgb(18, 20, i)[..., :1].repeat(1, -1)[..., 0]),
                      "raw": png, "captions": {"text": caps}, "image_id": 100 + i}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    Dalle3JaxTinyCaptions(data_dir=d, file_format="array_record").download_and_prepare()
    return d


def test_tfds_source(tfds_dir):
    src = TfdsSource("dalle3_jax_tiny_captions", "train", data_dir=tfds_dir, id_key="image_id",
                     caption_keys={"alt": "captions/text"})
    assert len(src) == 5
    by_id = {src[i]["id"]: src[i] for i in range(5)}
    assert sorted(by_id) == [str(100 + i) for i in range(5)]
    for i in (0, 1, 2, 4):
        rec = by_id[str(100 + i)]
        assert rec["captions"] == {"alt": f"photo {i}"}
        assert isinstance(rec["image"], bytes)  # decoding skipped inside TFDS
        np.testing.assert_array_equal(R.decode_image(rec["image"]), rand_rgb(18, 20, i))
        R.decode_record(R.encode_record(rec))  # schema-valid
    assert by_id["103"]["captions"] == {"alt": ""} and "alt:missing_caption" in by_id["103"]["meta"]["normalised"]
    with pytest.raises(IndexError):
        src[5]
    clone = pickle.loads(pickle.dumps(src))
    assert clone[0]["id"] == src[0]["id"]

    # Bytes Tensor feature as image, the second caption, default ids, another split.
    other = TfdsSource("dalle3_jax_tiny_captions", "validation", data_dir=tfds_dir, image_key="raw",
                       caption_keys={"second": "captions/text"}, caption_index=1)
    assert len(other) == 2 and other[0]["id"].startswith("dalle3_jax_tiny_captions/validation/")
    assert {other[i]["captions"]["second"] for i in range(2)} == {"second caption 0", "second caption 1"}
    grey = TfdsSource("dalle3_jax_tiny_captions", "train", data_dir=tfds_dir, image_key="grey")
    assert R.decode_image(grey[0]["image"]).shape == (18, 20, 3)

    with pytest.raises(ValueError, match="'nope' is not a feature"):
        TfdsSource("dalle3_jax_tiny_captions", "train", data_dir=tfds_dir, image_key="nope")
    with pytest.raises(FileNotFoundError, match="no_such_dataset"):
        TfdsSource("no_such_dataset", "train", data_dir=tfds_dir)


# ----------------------------------------------------------------------------- make_source


def test_make_source(tmp_path, tfds_dir):
    cfg = default_data_config()
    cfg.source = "nonsense"
    with pytest.raises(ValueError, match="world, arrayrecord, tfds"):
        make_source(cfg)

    cfg.source = "arrayrecord"
    cfg.arrayrecord_pattern = str(tmp_path / "{split}-*.array_record")
    with pytest.raises(FileNotFoundError, match="train-\\*.array_record"):
        make_source(cfg)
    with ShardWriter(tmp_path / "eval-0.array_record") as w:
        for r in _records(3):
            w.write(r)
    cfg.split = "eval"
    src = make_source(cfg)
    assert isinstance(src, ArrayRecordSource) and len(src) == 3 and src[2]["id"] == "r2"

    cfg = default_data_config()
    cfg.update(source="tfds", tfds_name="dalle3_jax_tiny_captions", tfds_split="validation",
               tfds_data_dir=tfds_dir, tfds_id_key="image_id")
    src = make_source(cfg)
    assert isinstance(src, TfdsSource) and len(src) == 2 and src[0]["id"] in ("100", "101")


def test_make_source_world():
    cfg = default_data_config()
    cfg.split = "finetune"
    cfg.world = {"image_size": 32, "finetune_size": 7}
    src = make_source(cfg)
    rec = src[0]
    assert len(src) == 7 and {"id", "image", "captions"} <= set(rec)
    assert R.decode_image(rec["image"]).shape == (32, 32, 3)
    R.decode_record(R.encode_record({k: rec[k] for k in rec if k in ("id", "image", "captions", "scene", "meta")}))
    assert isinstance(pickle.loads(pickle.dumps(src))[0]["id"], str)


def test_default_data_config_is_a_configdict():
    cfg = default_data_config()
    assert isinstance(cfg, ml_collections.ConfigDict) and cfg.source == "world"
    assert cfg.tfds_caption_keys.to_dict() == {"alt": "captions/text"}
