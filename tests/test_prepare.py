"""launch/prepare.py: img2dataset tars and parquet+folder -> ArrayRecord shards, with exact accounting."""

import io
import json
import os
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from dalle3_jax.data import prepare as P
from dalle3_jax.data import records as R
from dalle3_jax.data.sources import ArrayRecordSource


def enc(arr_or_img, fmt="PNG", **kw) -> bytes:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb(seed, h=24, w=32):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png16_rgb(h=20, w=20) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\x00" + np.full((w, 3), 0x8000, ">u2").tobytes() for _ in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def make_tar(path, members):
    """members: [(name, bytes)] written in order, as img2dataset does (a key's files together)."""
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def good_sample(key, seed, caption=None):
    caption = caption or f"a photo number {seed} of some shapes"
    image = enc(rgb(seed))
    meta = {"url": f"http://example.com/{key}.jpg", "key": key, "width": 32, "height": 24, "caption": caption}
    return [(f"{key}.png", image), (f"{key}.txt", caption.encode()), (f"{key}.json", json.dumps(meta).encode())]


def expected_record(key, seed, source, caption=None):
    caption = caption or f"a photo number {seed} of some shapes"
    return {"id": key, "image": enc(rgb(seed)), "captions": {"alt": caption},
            "meta": {"url": f"http://example.com/{key}.jpg", "key": key, "width": 32, "height": 24, "source": source}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("wds")
    cap = lambda s: s.encode()  # noqa: E731
    big = enc(Image.new("RGB", (10000, 10000), (200, 30, 30)), "JPEG", quality=40)
    full_jpeg = enc(rgb(9, 64, 64), "JPEG")
    a = (good_sample("000000000", 0)
         + [("000000001.jpg", enc(rgb(1), "JPEG")), ("000000001.txt", cap("a jpeg photo"))]
         + [("000000002.png", enc(rgb(2))), ("000000002.json", json.dumps({"caption": "from json", "url": "u2"}).encode())]
         + [("000000003.webp", enc(rgb(3), "WEBP")), ("000000003.txt", cap("a webp photo"))]
         + [("corrupt.jpg", b"definitely not an image"), ("corrupt.txt", cap("x"))]
         + [("trunc.jpg", full_jpeg[: len(full_jpeg) // 2]), ("trunc.txt", cap("cut"))]
         + [("grey.png", enc(rgb(4)[..., 0])), ("grey.txt", cap("grey"))]
         + [("rgba.png", enc(np.dstack([rgb(5), np.full((24, 32), 128, np.uint8)]))), ("rgba.txt", cap("rgba"))]
         + [("deep.png", png16_rgb()), ("deep.txt", cap("sixteen bits"))]
         + [("tiny.png", enc(np.zeros((1, 1, 3), np.uint8))), ("tiny.txt", cap("one pixel"))]
         + [("huge.jpg", big), ("huge.txt", cap("ten thousand square"))]
         + [("nocap.png", enc(rgb(6)))]
         + [("emptycap.png", enc(rgb(7))), ("emptycap.txt", b"   \n")]
         + [("latin.png", enc(rgb(8))), ("latin.txt", b"caf\xe9 cr\xe8me")]
         + [("longcap.png", enc(rgb(10))), ("longcap.txt", cap("word " * 20000))]
         + [("../evil.png", enc(rgb(11))), ("../evil.txt", cap("escape"))]
         + [("/abs/evil.png", enc(rgb(12))), ("/abs/evil.txt", cap("absolute"))]
         + [("orphan.txt", cap("caption without image"))]
         + good_sample("000000004", 13))
    make_tar(d / "a.tar", a)

    # b.tar: two good samples, then the file is cut in the middle of the third one's image.
    make_tar(d / "full_b.tar", good_sample("b0", 20) + good_sample("b1", 21) + good_sample("b2", 22))
    with tarfile.open(d / "full_b.tar") as tf:
        m = tf.getmember("b2.png")
        cut = m.offset_data + m.size // 2
    (d / "b.tar").write_bytes((d / "full_b.tar").read_bytes()[:cut])
    os.remove(d / "full_b.tar")
    make_tar(tmp_path_factory.mktemp("later") / "c.tar", good_sample("c0", 30))
    return d


A_REJECTS = {"corrupt": "corrupt_image", "trunc": "truncated_image", "tiny": "image_too_small",
             "nocap": "missing_caption", "emptycap": "empty_caption", "../evil": "unsafe_path",
             "/abs/evil": "unsafe_path", "orphan": "missing_image"}
A_NORMALISED = {"grayscale": 1, "alpha_composited": 1, "16bit": 1, "downscaled": 1, "non_utf8_caption": 1,
                "caption_truncated": 1, "reencoded_webp": 1, "whitespace": 1}


def test_prepare_tar_every_bad_case(inputs, tmp_path):
    out = tmp_path / "out"
    logs = []
    s = P.prepare([str(inputs / "*.tar")], str(out), records_per_shard=4, log=logs.append)
    # a.tar: 19 samples, 8 rejected; b.tar: 3 samples, the cut one rejected.
    assert (s["read"], s["written"], s["rejected"]) == (22, 13, 9)
    assert s["rejected_by_reason"] == {"corrupt_image": 1, "truncated_image": 1, "image_too_small": 1,
                                       "missing_caption": 1, "empty_caption": 1, "unsafe_path": 2,
                                       "missing_image": 1, "truncated_input": 1}
    assert s["normalised_by_reason"] == A_NORMALISED
    assert list(s["input_errors"]) == [str(inputs / "b.tar")] and "truncated" in s["input_errors"][str(inputs / "b.tar")]
    assert json.loads((out / "summary.json").read_text()) == s
    assert any("records/s" in line for line in logs)

    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["id"]: r["reason"] for r in rejects if r["source"].endswith("a.tar")} == A_REJECTS
    assert [(r["id"], r["reason"]) for r in rejects if r["source"].endswith("b.tar")] == [("b2", "truncated_input")]
    assert all(r["detail"] for r in rejects)

    # a.tar's 11 records in shards of 4, 4 and 3, then b.tar's 2 in a shard of its own.
    shards = sorted(p for p in os.listdir(out) if p.endswith(".array_record"))
    assert shards == [f"prepared-{i:05d}-of-00004.array_record" for i in range(4)] and s["shards"] == 4
    src = ArrayRecordSource(str(out / "prepared-*.array_record"))
    recs = {r["id"]: r for r in (src[i] for i in range(len(src)))}
    assert len(src) == 13 and len(recs) == 13
    # Clean samples come back byte-identical; nothing was re-encoded.
    for key, seed in (("000000000", 0), ("000000004", 13)):
        assert recs[key] == expected_record(key, seed, "a.tar")
    for key, seed in (("b0", 20), ("b1", 21)):
        assert recs[key] == expected_record(key, seed, "b.tar")
    assert recs["000000001"]["image"] == enc(rgb(1), "JPEG") and "normalised" not in recs["000000001"]["meta"]
    assert recs["000000002"]["captions"] == {"alt": "from json"} and recs["000000002"]["meta"]["url"] == "u2"
    # Normalised samples: RGB, within the size limits, reasons kept in meta.
    assert R.decode_image(recs["huge"]["image"]).shape == (1024, 1024, 3)
    assert recs["huge"]["meta"]["normalised"] == ["downscaled"]
    assert (R.decode_image(recs["deep"]["image"]) == 0x80).all()
    assert recs["latin"]["captions"]["alt"] == "caf\u00e9 cr\u00e8me"
    assert len(recs["longcap"]["captions"]["alt"]) <= R.MAX_CAPTION_CHARS
    assert recs["grey"]["meta"]["normalised"] == ["grayscale"]
    assert R.image_format(recs["000000003"]["image"]) == "jpeg"


def test_rerun_skips_finished_work_and_resumes(inputs, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    c_tar = next(inputs.parent.glob("later*/c.tar"))
    real = P.convert_input

    def crash_on_b(path, work_dir, settings):
        if path.endswith("b.tar"):
            os.makedirs(work_dir, exist_ok=True)
            open(os.path.join(work_dir, "part-00000.array_record"), "wb").write(b"half written")
            raise KeyboardInterrupt("simulated crash while converting b.tar")
        return real(path, work_dir, settings)

    monkeypatch.setattr(P, "convert_input", crash_on_b)
    with pytest.raises(KeyboardInterrupt):
        P.prepare([str(inputs / "*.tar"), str(c_tar)], out, records_per_shard=4, log=lambda m: None)
    monkeypatch.setattr(P, "convert_input", real)
    state = json.load(open(os.path.join(out, P.STATE_FILE)))
    assert sorted(os.path.basename(p) for p in state["inputs"]) == ["a.tar", "c.tar"]

    logs = []
    s = P.prepare([str(inputs / "*.tar"), str(c_tar)], out, records_per_shard=4, log=logs.append)
    assert (s["inputs_skipped"], s["inputs_converted"]) == (2, 1)
    assert any("skipping 2 of 3 inputs already converted" in line for line in logs)
    assert (s["read"], s["written"], s["rejected"], s["shards"]) == (23, 14, 9, 5)
    names = sorted(p for p in os.listdir(out) if p.endswith(".array_record"))
    assert names == [f"prepared-{i:05d}-of-00005.array_record" for i in range(5)]  # renumbered, none stale
    src = ArrayRecordSource(os.path.join(out, "*.array_record"))
    # Inputs are ordered by path: .../later0/c.tar, then .../wds0/a.tar and b.tar.
    assert len(src) == 14 and src[0] == expected_record("c0", 30, "c.tar")
    assert src[1]["id"] == "000000000" and src[13] == expected_record("b1", 21, "b.tar")

    # Nothing left to do: everything skipped, same outputs.
    before = {n: os.path.getmtime(os.path.join(out, n)) for n in names}
    s2 = P.prepare([str(inputs / "*.tar"), str(c_tar)], out, records_per_shard=4, log=lambda m: None)
    assert s2["inputs_converted"] == 0 and s2["inputs_skipped"] == 3 and s2["written"] == 14
    assert before == {n: os.path.getmtime(os.path.join(out, n)) for n in names}
    with pytest.raises(ValueError, match="records_per_shard"):
        P.prepare([str(c_tar)], out, records_per_shard=5, log=lambda m: None)


def test_prepare_parallel_workers(inputs, tmp_path):
    s = P.prepare([str(inputs / "*.tar")], str(tmp_path / "par"), records_per_shard=4, workers=2, log=lambda m: None)
    serial = P.prepare([str(inputs / "*.tar")], str(tmp_path / "ser"), records_per_shard=4, log=lambda m: None)
    for k in ("read", "written", "rejected", "rejected_by_reason", "normalised_by_reason", "shards"):
        assert s[k] == serial[k]
    par, ser = ArrayRecordSource(str(tmp_path / "par")), ArrayRecordSource(str(tmp_path / "ser"))
    assert [par[i] for i in range(len(par))] == [ser[i] for i in range(len(ser))]


def test_prepare_parquet_and_folder(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    images = tmp_path / "images"
    images.mkdir()
    for key, seed in (("k0", 0), ("k1", 1), ("k4", 4)):
        (images / f"{key}.jpg").write_bytes(enc(rgb(seed), "JPEG"))
    (images / "k5.jpg").write_bytes(b"garbage")
    table = pa.table({
        "key": ["k0", "k1", "k2", "k3", "../k4", "k5", "k4"],
        "caption": ["first", "second", "no file", "failed", "escape", "bad bytes", None],
        "url": ["u0", "u1", "u2", "u3", "u4", "u5", "u6"],
        "status": ["success", "success", "success", "failed_to_download", "success", "success", "success"],
    })
    pq.write_table(table, tmp_path / "meta.parquet")
    out = tmp_path / "out"
    s = P.main(["--input", str(tmp_path / "meta.parquet"), "--images", str(images), "--output", str(out)])
    assert (s["read"], s["written"], s["rejected"]) == (7, 2, 5)
    assert s["rejected_by_reason"] == {"missing_image": 1, "not_downloaded": 1, "unsafe_path": 1,
                                      "corrupt_image": 1, "missing_caption": 1}
    src = ArrayRecordSource(str(out / "prepared-*.array_record"))
    assert [src[i]["id"] for i in range(2)] == ["k0", "k1"]
    assert src[1] == {"id": "k1", "image": enc(rgb(1), "JPEG"), "captions": {"alt": "second"},
                      "meta": {"url": "u1", "source": "meta.parquet", "width": 32, "height": 24}}
    rejects = {json.loads(x)["id"]: json.loads(x)["reason"] for x in (out / "rejects.jsonl").read_text().splitlines()}
    assert rejects == {"k2": "missing_image", "k3": "not_downloaded", "../k4": "unsafe_path",
                       "k5": "corrupt_image", "k4": "missing_caption"}

    # Images stored in the parquet itself (bytes column), custom column names.
    t2 = pa.table({"uid": [7, 8], "text": ["seven", "eight"], "img": [enc(rgb(7)), enc(rgb(8))]})
    pq.write_table(t2, tmp_path / "inline.parquet")
    s = P.prepare(str(tmp_path / "inline.parquet"), str(tmp_path / "out2"), id_column="uid",
                  caption_column="text", image_column="img", log=lambda m: None)
    assert (s["read"], s["written"]) == (2, 2)
    src = ArrayRecordSource(str(tmp_path / "out2"))
    assert src[0]["id"] == "7" and src[0]["image"] == enc(rgb(7)) and src[1]["captions"] == {"alt": "eight"}
    with pytest.raises(ValueError, match="no column 'nope'"):
        P.prepare(str(tmp_path / "inline.parquet"), str(tmp_path / "out3"), caption_column="nope", id_column="uid",
                  image_column="img", log=lambda m: None)


def test_prepare_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        P.prepare(str(tmp_path / "nothing-here*.tar"), str(tmp_path / "o"))
    (tmp_path / "junk.tar").write_bytes(b"not a tar file at all" * 100)
    s = P.prepare(str(tmp_path / "junk.tar"), str(tmp_path / "o"), log=lambda m: None)
    assert s["read"] == 0 and s["shards"] == 0 and "junk.tar" in next(iter(s["input_errors"]))


def test_links_duplicates_and_gzip(tmp_path):
    with tarfile.open(tmp_path / "odd.tar.gz", "w:gz") as tf:
        d = tarfile.TarInfo("sub")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)  # directories are not samples
        for name, data in good_sample("sub/k0", 1) + [("dup.png", enc(rgb(2))), ("dup.txt", b"one"),
                                                      ("other.txt", b"between"), ("dup.txt", b"again")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    s = P.prepare(str(tmp_path / "odd.tar.gz"), str(tmp_path / "o"), log=lambda m: None)
    assert (s["read"], s["written"]) == (5, 2)
    assert s["rejected_by_reason"] == {"missing_image": 1, "duplicate_id": 1, "not_a_file": 1}
    src = ArrayRecordSource(str(tmp_path / "o"))
    assert src[0]["id"] == "sub/k0" and src[1]["captions"] == {"alt": "one"}


def test_interrupted_renumbering_is_finished_by_the_next_run(inputs, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    P.prepare(str(inputs / "a.tar"), out, records_per_shard=4, log=lambda m: None)
    c_tar = str(next(inputs.parent.glob("later*/c.tar")))
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        if str(dst).endswith(".renaming"):
            calls.append(dst)
            if len(calls) == 2:  # the second shard's rename: the machine "dies" here
                raise KeyboardInterrupt("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(P.os, "replace", flaky_replace)
    with pytest.raises(KeyboardInterrupt):
        P.prepare([str(inputs / "a.tar"), c_tar], out, records_per_shard=4, log=lambda m: None)
    monkeypatch.setattr(P.os, "replace", real_replace)
    assert json.load(open(os.path.join(out, P.STATE_FILE)))["pending"]["phase"] == "A"
    s = P.prepare([str(inputs / "a.tar"), c_tar], out, records_per_shard=4, log=lambda m: None)
    assert s["inputs_skipped"] == 2 and s["written"] == 12 and s["shards"] == 4
    names = sorted(os.listdir(out))
    assert [n for n in names if "array_record" in n] == [f"prepared-{i:05d}-of-00004.array_record" for i in range(4)]
    src = ArrayRecordSource(os.path.join(out, "prepared-*"))
    assert src[0] == expected_record("c0", 30, "c.tar") and src[1] == expected_record("000000000", 0, "a.tar")


def test_changed_input_is_converted_again(inputs, tmp_path):
    out = tmp_path / "out"
    make_tar(tmp_path / "d.tar", good_sample("d0", 40))
    P.prepare(str(tmp_path / "d.tar"), str(out), log=lambda m: None)
    (out / "prepared-00007-of-00009.array_record").write_bytes(b"left over from an older layout")
    make_tar(tmp_path / "d.tar", good_sample("d0", 40) + good_sample("d1", 41))  # img2dataset rerun
    logs = []
    s = P.prepare(str(tmp_path / "d.tar"), str(out), log=logs.append)
    assert any("changed size" in line for line in logs)
    assert (s["inputs_converted"], s["read"], s["written"], s["shards"]) == (1, 2, 2, 1)
    assert sorted(p.name for p in out.glob("*.array_record")) == ["prepared-00000-of-00001.array_record"]
    src = ArrayRecordSource(str(out))
    assert [src[i]["id"] for i in range(2)] == ["d0", "d1"]
