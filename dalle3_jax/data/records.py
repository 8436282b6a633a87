"""The one record schema shared by every data source and by the ArrayRecord shards we write.

A record is a plain dict:

    {
      "id":       str, non-empty; unique within a dataset (img2dataset key, TFDS id, world index).
      "image":    bytes, an encoded PNG or JPEG. In memory a source may hand out an np.uint8
                  [H, W, 3] array instead (the synthetic world renders pixels); encode_record
                  turns such an array into PNG bytes, so shards always hold encoded images.
      "captions": {name: str, ...}, at least one entry. Names in use: "alt" (scraped alt-text),
                  "short" and "descriptive" (ground truth), "ssc" and "dsc" (written by the
                  recaptioner). Values are normalised text (see normalise_caption); a source
                  may carry "" for a caption it lacks, which pipelines treat as unconditional.
      "scene":    str, optional: JSON of the true scene (synthetic world only).
      "meta":     dict, optional: provenance, e.g. {"source": "00012.tar", "url": ...,
                  "width": ..., "height": ..., "original_width": ..., "normalised": [...]}.
                  Values must be msgpack-serialisable (str, int, float, bool, None, bytes,
                  lists and str-keyed dicts of those).
      "latent":   dict, optional: the image's autoencoder latent [h, w, C] as written by
                  launch/precompute_latents.py, {"dtype": "float16" | "float32", "shape":
                  [h, w, C], "data": raw little-endian bytes} (encode_array / decode_array).
      "text_states": dict, optional: a frozen text encoder's output for each caption that T2I
                  blending can pick, {caption name: {"states": [L, D], "mask": [L] (1 = real
                  token), "pooled": [D]}}, each an encode_array field (precompute_latents.py
                  --text_states).
    }

On disk a record is one msgpack map (never pickle: a shard must not be able to run code) with
the keys above plus "v": the schema version (SCHEMA_VERSION), so a reader can refuse a record it
does not understand instead of misreading it. decode_record validates and raises RecordError
naming the field that is wrong.

Images and captions from the wild are normalised here, in one place, so that prepare, the
sources and the recaptioner all agree on what a clean record is. Each normaliser returns the
list of reasons (short snake_case strings) for what it changed, so callers can count them, and
raises RecordError (with a .reason string of the same kind) for what cannot be repaired.
"""

from __future__ import annotations

import io
import json
import re
import unicodedata
import warnings
from typing import Any

import msgpack
import numpy as np
from PIL import Image, ImageOps

SCHEMA_VERSION = 1
_KEYS_REQUIRED = ("id", "image", "captions")
_KEYS_OPTIONAL = ("scene", "meta", "latent", "text_states")
ARRAY_DTYPES = ("float16", "float32")  # what an array field ("latent", "text_states") may hold
# The parts of one caption's cached text-encoder output ({caption name: {part: array}}).
TEXT_STATE_PARTS = ("states", "mask", "pooled")

# Defaults shared by prepare and the sources; all are overridable per call.
MIN_SIDE = 16  # below this an image carries no usable content for a 32-64 px model
MAX_SIDE = 1024  # long side after downscaling; bigger only costs storage and decode time
# Our own decompression-bomb limit. PIL warns above 89 M pixels and refuses above 179 M; we
# silence its warning and apply this limit ourselves so that a 10000x10000 photo (100 M) is
# downscaled rather than lost, while a header claiming 20000x20000 is rejected before decoding.
MAX_PIXELS = 2**27
MAX_CAPTION_CHARS = 2000

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class RecordError(ValueError):
    """A record (or one of its fields) is invalid and cannot be repaired.

    `reason` is a short snake_case category for counting ("corrupt_image", "empty_caption", ...);
    the message says what exactly is wrong.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


# ----------------------------------------------------------------------------- serialisation


def _msgpack_default(obj: Any) -> Any:
    # numpy scalars sneak into meta (image sizes, TFDS features); store them as Python values.
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"type {type(obj).__name__} is not msgpack-serialisable")


def _validate(rec: Any, *, where: str, image_may_be_array: bool) -> None:
    if not isinstance(rec, dict):
        raise RecordError("bad_record", f"{where}: a record must be a dict, got {type(rec).__name__}")
    missing = [k for k in _KEYS_REQUIRED if k not in rec]
    if missing:
        raise RecordError("bad_record", f"{where}: missing field(s) {missing}")
    unknown = sorted(set(rec) - set(_KEYS_REQUIRED) - set(_KEYS_OPTIONAL))
    if unknown:
        raise RecordError("bad_record", f"{where}: unknown field(s) {unknown}; allowed: "
                          f"{list(_KEYS_REQUIRED + _KEYS_OPTIONAL)}")
    if not isinstance(rec["id"], str) or not rec["id"]:
        raise RecordError("bad_record", f"{where}: 'id' must be a non-empty str, got {rec['id']!r}")
    img = rec["image"]
    if not (isinstance(img, bytes) or (image_may_be_array and isinstance(img, np.ndarray))):
        raise RecordError("bad_record", f"{where}: 'image' of record {rec['id']!r} must be encoded "
                          f"bytes, got {type(img).__name__}")
    caps = rec["captions"]
    if not isinstance(caps, dict) or not caps:
        raise RecordError("bad_record", f"{where}: 'captions' of record {rec['id']!r} must be a "
                          f"non-empty dict of name -> str")
    for name, text in caps.items():
        if not isinstance(name, str) or not isinstance(text, str):
            raise RecordError("bad_record", f"{where}: caption {name!r} of record {rec['id']!r} must "
                              f"be str -> str, got {type(name).__name__} -> {type(text).__name__}")
    if rec.get("scene") is not None and not isinstance(rec["scene"], str):
        raise RecordError("bad_record", f"{where}: 'scene' of record {rec['id']!r} must be a JSON str")
    if rec.get("meta") is not None and not isinstance(rec["meta"], dict):
        raise RecordError("bad_record", f"{where}: 'meta' of record {rec['id']!r} must be a dict")
    if rec.get("latent") is not None:
        decode_array(rec["latent"], where=f"{where}: 'latent' of record {rec['id']!r}")
    if rec.get("text_states") is not None:
        _validate_text_states(rec["text_states"], where=f"{where}: 'text_states' of record {rec['id']!r}")


def _validate_text_states(field: Any, *, where: str) -> None:
    # {caption name: {"states": [L, D], "mask": [L], "pooled": [D]}} (diffusion/text_cache.py)
    if not isinstance(field, dict):
        raise RecordError("bad_record", f"{where}: expected a map of caption name -> encoder output")
    for name, parts in field.items():
        if not isinstance(parts, dict) or set(parts) != set(TEXT_STATE_PARTS):
            raise RecordError("bad_record", f"{where}: caption {name!r} needs exactly {list(TEXT_STATE_PARTS)}")
        for part in TEXT_STATE_PARTS:
            decode_array(parts[part], where=f"{where}[{name!r}].{part}")


def encode_array(array: np.ndarray) -> dict:
    """A float16/float32 array as a record field: {"dtype", "shape", "data"} (little-endian bytes)."""
    array = np.asarray(array)
    if array.dtype.name not in ARRAY_DTYPES:
        raise RecordError("bad_record", f"encode_array: dtype {array.dtype.name}; allowed: {ARRAY_DTYPES}")
    return {"dtype": array.dtype.name, "shape": list(array.shape),
            "data": np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()}


def decode_array(field: Any, *, where: str = "decode_array") -> np.ndarray:
    """The array of a record field written by encode_array (read-only view of its bytes)."""
    if not isinstance(field, dict) or set(field) != {"dtype", "shape", "data"}:
        raise RecordError("bad_record", f"{where}: expected a map with dtype, shape and data")
    dtype, shape, data = field["dtype"], field["shape"], field["data"]
    if dtype not in ARRAY_DTYPES or not isinstance(data, bytes) or not isinstance(shape, (list, tuple)):
        raise RecordError("bad_record", f"{where}: dtype {dtype!r} (allowed {ARRAY_DTYPES}), shape {shape!r}, "
                          f"data of type {type(data).__name__}")
    itemsize = np.dtype(dtype).itemsize
    if len(data) != itemsize * int(np.prod(shape)):
        raise RecordError("bad_record", f"{where}: {len(data)} bytes do not hold a {dtype} array of shape {shape}")
    return np.frombuffer(data, np.dtype(dtype).newbyteorder("<")).reshape(shape)


def encode_record(rec: dict) -> bytes:
    """Validates `rec` and serialises it to msgpack bytes (array images are encoded to PNG)."""
    _validate(rec, where="encode_record", image_may_be_array=True)
    out = {"v": SCHEMA_VERSION, "id": rec["id"], "captions": dict(rec["captions"])}
    img = rec["image"]
    out["image"] = encode_image(decode_image(img)) if isinstance(img, np.ndarray) else img
    if rec.get("scene") is not None:
        try:  # checked on the write side only: readers should not pay for a parse per record
            json.loads(rec["scene"])
        except ValueError as e:
            raise RecordError("bad_record", f"encode_record: 'scene' of {rec['id']!r} is not JSON: {e}")
        out["scene"] = rec["scene"]
    if rec.get("meta") is not None:
        out["meta"] = rec["meta"]
    for key in ("latent", "text_states"):
        if rec.get(key) is not None:
            out[key] = rec[key]
    try:
        return msgpack.packb(out, use_bin_type=True, default=_msgpack_default)
    except (TypeError, ValueError, OverflowError) as e:
        raise RecordError("bad_record", f"encode_record: record {rec['id']!r} cannot be "
                          f"serialised ({e}); 'meta' may hold only plain values")


def decode_record(data: bytes) -> dict:
    """Parses msgpack bytes written by encode_record; raises RecordError if they are not a record."""
    try:
        rec = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types for garbage input
        raise RecordError("bad_record", f"decode_record: not a msgpack record ({type(e).__name__}: {e})")
    if not isinstance(rec, dict):
        raise RecordError("bad_record", f"decode_record: expected a map, got {type(rec).__name__}")
    version = rec.pop("v", None)
    if version != SCHEMA_VERSION:
        raise RecordError("bad_record", f"decode_record: schema version {version!r}, this reader "
                          f"understands version {SCHEMA_VERSION}")
    _validate(rec, where="decode_record", image_may_be_array=False)
    return rec


# ----------------------------------------------------------------------------- images


def encode_image(image: np.ndarray, format: str = "png", quality: int = 95) -> bytes:
    """Encodes an np.uint8 [H, W, 3] (or [H, W]) array as PNG (lossless) or JPEG."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise RecordError("bad_image", f"encode_image wants uint8 [H, W, 3], got {image.dtype} {image.shape}")
    fmt = format.lower()
    if fmt not in ("png", "jpeg", "jpg"):
        raise ValueError(f"format must be 'png' or 'jpeg', got {format!r}")
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(image).save(buf, format="PNG", compress_level=6)
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _array_to_rgb(arr: np.ndarray, reasons: list[str]) -> np.ndarray:
    """Turns a decoded array of any common layout into uint8 [H, W, 3], noting what changed."""
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        # Keep the high byte: the same mapping PIL uses for 16-bit RGB PNGs (x >> 8).
        arr = (arr >> 8).astype(np.uint8)
        reasons.append("16bit")
    elif arr.dtype != np.uint8:
        raise RecordError("bad_image", f"image dtype {arr.dtype} is not supported (uint8/uint16/bool)")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        reasons.append("grayscale")
        return np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (2, 3, 4):
        raise RecordError("bad_image", f"image shape {arr.shape} is not [H, W] or [H, W, 1|2|3|4]")
    if arr.shape[-1] == 3:
        return arr
    # Grey+alpha or RGBA: composite on white, like a browser shows a transparent web image.
    if arr.shape[-1] == 2:
        reasons.append("grayscale")
    reasons.append("alpha_composited")
    colour = arr[..., :-1] if arr.shape[-1] == 4 else np.repeat(arr[..., :1], 3, axis=-1)
    alpha = arr[..., -1:].astype(np.float32) / 255.0
    out = colour.astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _pil_to_rgb(img: Image.Image, reasons: list[str]) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img)
    if mode == "CMYK":
        reasons.append("cmyk")
        return np.asarray(img.convert("RGB"))
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey (PIL opens some as 32-bit "I" holding 0..65535): scale like uint16.
        return _array_to_rgb(np.clip(np.asarray(img), 0, 65535).astype(np.uint16), reasons)
    if mode in ("P", "PA", "1", "L") and (mode == "PA" or img.has_transparency_data):
        # A palette entry or a grey value marked transparent: make the alpha explicit.
        img = img.convert("RGBA" if mode.startswith("P") else "LA")
    elif mode == "P":
        reasons.append("palette")
        return np.asarray(img.convert("RGB"))
    elif mode in ("RGBa", "La"):  # premultiplied alpha: undo it so compositing is right
        img = img.convert(mode[:-1] + "A")
    elif mode == "1":
        img = img.convert("L")
    elif mode not in ("L", "LA", "RGBA"):
        # YCbCr, LAB, HSV, F, ...: let PIL convert; note it so odd inputs show up in counts.
        reasons.append("mode_" + mode.replace(";", "_").lower())
        return np.asarray(img.convert("RGB"))
    return _array_to_rgb(np.asarray(img), reasons)


def _png_bit_depth(data: bytes) -> int:
    # PIL silently reduces 16-bit RGB PNGs to 8 bits, so look at the IHDR chunk to count them.
    if data[:8] == _PNG_SIGNATURE and len(data) > 24 and data[12:16] == b"IHDR":
        return data[24]
    return 8


def normalise_image(
    data: bytes | np.ndarray,
    *,
    min_side: int = MIN_SIDE,
    max_side: int | None = MAX_SIDE,
    max_pixels: int = MAX_PIXELS,
) -> tuple[np.ndarray, list[str]]:
    """Decodes and cleans an image; returns (np.uint8 [H, W, 3] RGB, reasons for each change).

    Handles: grayscale -> RGB; RGBA/LA/P-with-transparency -> RGB on white; 16-bit -> 8-bit;
    CMYK -> RGB; EXIF orientation; long side > max_side -> downscaled (JPEGs decoded at reduced
    size via Image.draft, so a 10000x10000 photo stays cheap). Raises RecordError for corrupt
    ("corrupt_image") or truncated ("truncated_image") data, images smaller than min_side
    ("image_too_small") and more than max_pixels pixels ("image_too_large", a decompression bomb).
    An array input skips decoding but gets the same layout and size rules.
    """
    reasons: list[str] = []
    if isinstance(data, np.ndarray):
        arr = _array_to_rgb(data, reasons)
    else:
        arr = _decode_bytes(bytes(data), reasons, max_side=max_side, max_pixels=max_pixels)
    h, w = arr.shape[:2]
    if min(h, w) < min_side:
        raise RecordError("image_too_small", f"image is {w}x{h}, the short side must be >= {min_side}")
    if max_side is not None and max(h, w) > max_side:
        arr = _resize_long_side(arr, max_side)
        if "downscaled" not in reasons:
            reasons.append("downscaled")
    # A 16-bit grey PNG is noticed twice (header and array dtype): count each reason once.
    return arr, list(dict.fromkeys(reasons))


def _resize_long_side(arr: np.ndarray, max_side: int) -> np.ndarray:
    h, w = arr.shape[:2]
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.LANCZOS))


def _decode_bytes(data: bytes, reasons: list[str], *, max_side: int | None, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # We enforce max_pixels ourselves (below), so PIL's own bomb warning is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise RecordError("image_too_large", f"image claims {w}x{h} = {w * h} pixels, "
                                  f"more than max_pixels={max_pixels}")
            if img.format not in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "MPO"):
                reasons.append(f"format_{str(img.format).lower()}")
            if max_side is not None and img.format in ("JPEG", "MPO") and max(w, h) > max_side:
                # DCT scaling: decode at 1/2, 1/4 or 1/8 size, never below the requested size.
                scale = max_side / max(w, h)
                img.draft(None, (max(1, int(w * scale)), max(1, int(h * scale))))
                if img.size != (w, h):
                    reasons.append("downscaled")
            if _png_bit_depth(data) == 16:
                reasons.append("16bit")
            img.load()
            if img.getexif().get(0x0112, 1) in range(2, 9):  # 1 = upright; 2..8 flip/rotate
                img = ImageOps.exif_transpose(img)
                reasons.append("exif_rotated")
            arr = _pil_to_rgb(img, reasons)
    except RecordError:
        raise
    except Image.DecompressionBombError as e:
        raise RecordError("image_too_large", str(e))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        kind = "truncated_image" if "truncat" in str(e).lower() else "corrupt_image"
        raise RecordError(kind, f"cannot decode image ({type(e).__name__}: {e})")
    return arr


def decode_image(data: bytes | np.ndarray) -> np.ndarray:
    """Encoded bytes (or an already-decoded array) -> np.uint8 [H, W, 3] RGB, at full size.

    Unlike normalise_image this applies no size policy; use it on records that are already clean.
    """
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 3 and data.shape[-1] == 3:
        return data  # the common case (synthetic world): no copy
    arr, _ = normalise_image(data, min_side=1, max_side=None)
    return arr


def image_format(data: bytes) -> str:
    """'png', 'jpeg', or another lowercase format name read from the magic bytes ('' if unknown)."""
    if data[:8] == _PNG_SIGNATURE:
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return ""


def normalise_image_bytes(
    data: bytes, *, min_side: int = MIN_SIDE, max_side: int | None = MAX_SIDE, max_pixels: int = MAX_PIXELS,
    jpeg_quality: int = 95,
) -> tuple[bytes, list[str], tuple[int, int]]:
    """Cleans encoded image bytes for storage: returns (PNG or JPEG bytes, reasons, (H, W)).

    An image that needed no change keeps its original bytes (no recompression loss). Otherwise it
    is re-encoded: PNG if it came as PNG (lossless stays lossless), JPEG for everything else.
    """
    arr, reasons = normalise_image(data, min_side=min_side, max_side=max_side, max_pixels=max_pixels)
    fmt = image_format(data)
    if fmt not in ("png", "jpeg"):
        reasons.append(f"reencoded_{fmt or 'other'}")
    if not reasons:
        return data, reasons, arr.shape[:2]
    out = encode_image(arr, "png" if fmt == "png" else "jpeg", quality=jpeg_quality)
    return out, reasons, arr.shape[:2]


# ----------------------------------------------------------------------------- captions

# Control characters (Cc) and invisible format characters that break tokenisers; ZWJ/ZWNJ
# (which join emoji and some scripts) are kept.
_INVISIBLE = {"\u200b", "\u2060", "\ufeff", "\u00ad"}
_WS = re.compile(r"\s+")


def _decode_text(raw: bytes, reasons: list[str]) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        reasons.append("non_utf8_caption")
    # Web text that is not UTF-8 is almost always Windows-1252 (a superset of Latin-1 for the
    # printable range); Latin-1 decodes every byte, so it is the fallback that cannot fail.
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def normalise_caption(text: str | bytes | None, *, max_chars: int = MAX_CAPTION_CHARS) -> tuple[str, list[str]]:
    """Cleans caption text; returns (text, reasons for each change).

    bytes are decoded as UTF-8, else Windows-1252/Latin-1 ("non_utf8_caption"); control and
    invisible characters are removed ("control_chars"); runs of whitespace become one space and
    ends are stripped ("whitespace"); text longer than max_chars is cut at a word boundary
    ("caption_truncated"). Raises RecordError "missing_caption" for None, "empty_caption" when
    nothing is left.
    """
    reasons: list[str] = []
    if text is None:
        raise RecordError("missing_caption", "no caption")
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = _decode_text(bytes(text), reasons)
    elif not isinstance(text, str):
        raise RecordError("bad_caption", f"caption must be str or bytes, got {type(text).__name__}")
    joined = text
    if not text.isprintable():  # fast path: printable text has no control/invisible chars
        # Whitespace first: newlines and tabs are Cc too, but they separate words.
        joined = "".join(ch for ch in text if ch.isspace() or not (
            ch in _INVISIBLE or unicodedata.category(ch) in ("Cc", "Cs")))
    if len(joined) != len(text):
        reasons.append("control_chars")
    cleaned = _WS.sub(" ", joined).strip()
    if cleaned != joined:
        reasons.append("whitespace")
    if not cleaned:
        raise RecordError("empty_caption", "caption is empty after cleaning")
    if len(cleaned) > max_chars:
        cut = cleaned[: max_chars + 1]
        space = cut.rfind(" ")
        # Cut at the last word boundary unless that throws away more than half the budget
        # (one enormous "word", e.g. a URL or base64 blob).
        cleaned = (cut[:space] if space > max_chars // 2 else cleaned[:max_chars]).rstrip()
        reasons.append("caption_truncated")
    return cleaned, reasons
