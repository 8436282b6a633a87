"""Anti-aliased rendering of scenes to uint8 images [H, W, 3].

Each object is drawn as a polygon with PIL at SUPERSAMPLE x resolution inside its own small
bounding box, box-filtered down (the mean of SUPERSAMPLE^2 samples is the pixel's coverage) and
alpha-composited over the background. Working per object on a small crop keeps rendering fast
(thousands of 64 px images per second on one core).

Continuous coordinates: pixel (row j, column i) covers [i, i+1) x [j, j+1), so its centre is at
(i + 0.5, j + 0.5). The scene parser renders its templates with the same `shape_coverage`, so the
two always agree on geometry.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dalle3_jax.data.world import vocab
from dalle3_jax.data.world.scene import Scene

SUPERSAMPLE = 4  # samples per pixel side; 4 gives 17 coverage levels per pixel, plenty at 32-128 px
TEXT_FONT_FRACTION = 0.38  # font size of written words, as a fraction of the cell side
TEXT_STROKE = 0.5  # extra stroke (pixels) that makes words bold enough to survive blur


def _normalise(points: np.ndarray) -> np.ndarray:
    """Centre a polygon's bounding box on the origin and scale its longer side to 1."""
    lo, hi = points.min(0), points.max(0)
    return (points - (lo + hi) / 2) / (hi - lo).max()


def _star(n_points: int = 5, inner: float = 0.45) -> np.ndarray:
    ang = -math.pi / 2 + np.arange(2 * n_points) * math.pi / n_points
    rad = np.where(np.arange(2 * n_points) % 2 == 0, 1.0, inner)
    return np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)


def _circle(n: int = 48) -> np.ndarray:
    # A fine polygon rather than PIL's ellipse: one drawing primitive, one coordinate convention.
    ang = np.arange(n) * 2 * math.pi / n
    return np.stack([np.cos(ang), np.sin(ang)], 1)


_ARM = 1 / 6  # half-width of the cross's arms, as a fraction of its side
# Outlines in (x, y) with y pointing down, bounding box [-0.5, 0.5]^2 (longer side exactly 1).
UNIT_POLYGONS: dict[str, np.ndarray] = {
    "circle": _normalise(_circle()),
    "square": _normalise(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)),
    "triangle": _normalise(np.array([[0, -1], [1, 1], [-1, 1]], float)),
    "diamond": _normalise(np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], float)),
    "star": _normalise(_star()),
    "cross": _normalise(np.array([
        [-_ARM, -0.5], [_ARM, -0.5], [_ARM, -_ARM], [0.5, -_ARM], [0.5, _ARM], [_ARM, _ARM],
        [_ARM, 0.5], [-_ARM, 0.5], [-_ARM, _ARM], [-0.5, _ARM], [-0.5, -_ARM], [-_ARM, -_ARM]], float)),
}
assert set(UNIT_POLYGONS) == set(vocab.SHAPES)


def _polygon_area_centroid(p: np.ndarray) -> tuple[float, float, float]:
    """Area and centroid (shoelace formula) of a simple polygon."""
    x, y = p[:, 0], p[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2
    return abs(area), float(((x + xn) * cross).sum() / (6 * area)), float(((y + yn) * cross).sum() / (6 * area))


# Per shape: (area, centroid x, centroid y) of the unit outline. The parser uses them to turn an
# observed mass and centre of mass into a side length and a bounding-box centre.
UNIT_GEOMETRY: dict[str, tuple[float, float, float]] = {
    s: _polygon_area_centroid(p) for s, p in UNIT_POLYGONS.items()
}


def shape_coverage(shape: str, cx: float, cy: float, side: float, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Coverage in [0, 1], float32 [h, w], of a shape with bbox centre (cx, cy) and side `side`.

    The window is the pixel block with top-left pixel (x0, y0); coordinates are continuous pixels.
    """
    if w <= 0 or h <= 0:
        return np.zeros((max(h, 0), max(w, 0)), np.float32)
    s = SUPERSAMPLE
    pts = UNIT_POLYGONS[shape] * side + (cx - x0, cy - y0)
    # PIL fills samples whose centres lie inside; sample k sits at continuous (k + 0.5) / s.
    pts = pts * s - 0.5
    im = Image.new("L", (w * s, h * s), 0)
    ImageDraw.Draw(im).polygon([tuple(q) for q in pts.tolist()], fill=255)
    return np.asarray(im.reduce(s), dtype=np.float32) * (1 / 255)


@functools.lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.FreeTypeFont:
    # Pillow's bundled default font: identical on every machine with the same Pillow version.
    return ImageFont.load_default(size=px)


def text_font_px(image_size: int) -> int:
    """Font size (pixels, before supersampling) of written words at this image size."""
    return max(6, round(TEXT_FONT_FRACTION * image_size / 3))


def text_coverage(word: str, cx: float, cy: float, font_px: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Coverage in [0, 1], float32 [h, w], of a word centred at (cx, cy)."""
    s = SUPERSAMPLE
    im = Image.new("L", (w * s, h * s), 0)
    ImageDraw.Draw(im).text(((cx - x0) * s, (cy - y0) * s), word, fill=255, font=_font(font_px * s), anchor="mm",
                            stroke_width=round(TEXT_STROKE * s), stroke_fill=255)
    return np.asarray(im.reduce(s), dtype=np.float32) * (1 / 255)


@functools.lru_cache(maxsize=8)
def _centred_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates relative to the image centre, each [H, W]."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return xs + 0.5 - w / 2, ys + 0.5 - h / 2


def _unit_ramp(h: int, w: int, angle: float) -> np.ndarray:
    """A linear ramp in [-1, 1] over the image along `angle`, zero at the centre, [H, W]."""
    xs, ys = _centred_grid(h, w)
    c, s = math.cos(angle), math.sin(angle)
    # The extreme value sits at a corner pixel centre.
    peak = max(abs(c) * (w - 1) / 2 + abs(s) * (h - 1) / 2, 1e-6)
    return (xs * (c / peak) + ys * (s / peak)).astype(np.float32)


def background_image(scene: Scene, h: int, w: int) -> np.ndarray:
    """The background as float32 [H, W, 3] in 0-255 units (a plane per channel when graded)."""
    base = np.asarray(vocab.BACKGROUNDS[scene.background], np.float32)
    img = np.empty((h, w, 3), np.float32)
    img[:] = base
    if scene.gradient and scene.gradient_amount > 0:
        # Limit the swing per channel to the headroom so the gradient stays exactly linear
        # (no clipping): the parser removes it with a plane fit.
        amp = np.minimum(scene.gradient_amount * 255, np.minimum(base, 255 - base))
        img += _unit_ramp(h, w, scene.gradient_angle)[..., None] * amp
    return img


def object_layout(scene: Scene, image_size: int) -> list[tuple[int, str, str, float, float, float]]:
    """(group index, shape, colour, centre x, centre y, side) of every object, in pixels."""
    cell = image_size / 3
    out = []
    for k, g in enumerate(scene.groups):
        jitter = g.jitter or ((0.0, 0.0, 1.0),) * g.count
        for place, (dx, dy, scale) in zip(g.places, jitter):
            row, col = vocab.PLACE_CELLS[place]
            out.append((k, g.shape, g.colour, (col + 0.5 + dx) * cell, (row + 0.5 + dy) * cell,
                        vocab.SIZE_FRACTION[g.size] * scale * cell))
    return out


def _composite(img: np.ndarray, alpha: np.ndarray, rgb: np.ndarray, x0: int, y0: int) -> None:
    """img[window] = (1 - alpha) * img + alpha * rgb, in place."""
    h, w = alpha.shape
    win = img[y0:y0 + h, x0:x0 + w]
    win += alpha[..., None] * (rgb - win)


def render(scene: Scene, image_size: int = 64) -> np.ndarray:
    """Render a scene to uint8 [H, W, 3] with H = W = image_size."""
    n = int(image_size)
    img = background_image(scene, n, n)
    for _, shape, colour, cx, cy, side in object_layout(scene, n):
        half = side / 2 + 1
        x0, y0 = max(0, math.floor(cx - half)), max(0, math.floor(cy - half))
        x1, y1 = min(n, math.ceil(cx + half)), min(n, math.ceil(cy + half))
        alpha = shape_coverage(shape, cx, cy, side, x0, y0, x1 - x0, y1 - y0)
        _composite(img, alpha, np.asarray(vocab.COLOURS[colour], np.float32), x0, y0)
    if scene.text is not None and scene.text_place is not None:
        row, col = vocab.PLACE_CELLS[scene.text_place]
        cell = n / 3
        x0, y0 = math.floor(col * cell), math.floor(row * cell)
        x1, y1 = min(n, math.ceil((col + 1) * cell)), min(n, math.ceil((row + 1) * cell))
        cx = (col + 0.5 + scene.text_jitter[0]) * cell
        cy = (row + 0.5 + scene.text_jitter[1]) * cell
        alpha = text_coverage(scene.text, cx, cy, text_font_px(n), x0, y0, x1 - x0, y1 - y0)
        rgb = np.asarray(vocab.TEXT_COLOURS[vocab.TEXT_COLOUR_FOR_BACKGROUND[scene.background]], np.float32)
        _composite(img, alpha, rgb, x0, y0)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def degrade(image: np.ndarray, blur_sigma: float, noise_sigma: float, rng: np.random.Generator) -> np.ndarray:
    """A render softened by Gaussian blur (sigma in pixels) plus Gaussian noise (sigma on [0, 1]),
    clipped: float32 [H, W, 3] in [0, 1]. The standard robustness test for the scene parser."""
    from scipy import ndimage  # only the robustness checks need scipy here

    x = np.asarray(image, np.float32)
    if np.issubdtype(np.asarray(image).dtype, np.integer):
        x = x / 255
    if blur_sigma > 0:
        x = ndimage.gaussian_filter(x, (blur_sigma, blur_sigma, 0))
    if noise_sigma > 0:
        x = x + rng.normal(0.0, noise_sigma, x.shape).astype(np.float32)
    return np.clip(x, 0, 1)
