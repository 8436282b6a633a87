"""Image [H, W, 3] -> Scene: recover the objects, counts, places and background of a render.

Used to score generated images, so it degrades gracefully: it never raises on an array that can
be read as an image, and on noisy, blurred or tinted inputs it returns its best guess.

Method:
1. Background: a plane per channel (to absorb gradients), fitted robustly by iteratively
   refitting on the pixels close to the current fit, starting from the median of the border.
   Its centre colour names the background (nearest palette entry).
2. Foreground: pixels farther than a threshold from the background plane; 4-connected
   components. A component that lies mostly in one grid cell is that cell's candidate; one that
   straddles cells (objects merged by blur) is cut along the grid.
3. Per cell (one object per cell at most): the largest candidate, grown by two pixels to take in
   its anti-aliased rim, is explained as background + alpha * (colour - background) for every
   palette colour; the colour with the smallest residual wins, and alpha is the coverage map.
4. Shape and size: for each shape, the side length that matches alpha's mass and the centre that
   matches its centroid give a template (rendered with the renderer's own `shape_coverage`); the
   template with the smallest L1 distance to alpha wins, after a small local refinement. Size is
   small/large by comparing the fitted side to the cell side.
5. At H >= 96, a cell whose best colour is the text colour is read as a word by matching
   rendered templates of every known word.
Objects are then grouped by (colour, shape); a group's size is the majority of its objects.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import ndimage

from dalle3_jax.data.world import vocab
from dalle3_jax.data.world.rendering import UNIT_GEOMETRY, shape_coverage, text_coverage, text_font_px
from dalle3_jax.data.world.scene import Group, Scene

_COLOUR_NAMES = tuple(vocab.COLOURS)
_PALETTE = np.asarray([vocab.COLOURS[c] for c in _COLOUR_NAMES], np.float32) / 255
_BG_NAMES = tuple(vocab.BACKGROUNDS)
_BG_PALETTE = np.asarray([vocab.BACKGROUNDS[b] for b in _BG_NAMES], np.float32) / 255
# Side threshold between small and large (cell units): the geometric mean of the nominal sides.
_SIZE_SPLIT = math.sqrt(vocab.SIZE_FRACTION["small"] * vocab.SIZE_FRACTION["large"])
_MIN_TEXT_SIZE = 96  # words are only rendered at 128 px; below this size never look for them
# Template matching: refine when the two best shapes score within this L1 margin (relative to the
# object's mass); below it, clean renders are never ambiguous, so most objects skip refinement.
REFINE_MARGIN = 0.05
# A coverage peak below this marks a faint object whose alpha is rescaled (see parse_image).
FAINT_LEVEL = 0.85
# Extra template blurs (pixels) tried besides the sharp one; tuned on blur 0.7 + noise 0.03.
TEMPLATE_BLURS: tuple[float, ...] = (0.6, 1.0)
# Objects narrower than this (pixels; small objects at 32 px) are always refined, on a finer grid
# of offsets: at ~5 px a cross and a diamond differ by sub-pixel placement.
TINY_SIDE = 7.0
_OFFSETS = ((0, 0), (0.35, 0), (-0.35, 0), (0, 0.35), (0, -0.35))  # centre shifts in pixels
_OFFSETS_FINE = tuple((x, y) for x in (-0.3, 0, 0.3) for y in (-0.3, 0, 0.3))
_STRUCT4 = ndimage.generate_binary_structure(2, 1)


def to_float_image(image, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Any image-like array -> float32 [H, W, 3] in [0, 1].

    Accepts uint8 (0-255), floats in [0, 1] or [-1, 1], floats in 0-255, [H, W] grayscale,
    [H, W, 1|4], channel-first [3, H, W] and a leading batch of one. value_range (lo, hi) states
    the float range; without it the range is guessed: values above 1.5 mean 0-255, values below
    -0.02 mean [-1, 1] (every render has some channel below 128, i.e. negative there). Pass
    value_range=(0, 1) for unclipped noisy [0, 1] images, which would otherwise be misread.
    """
    a = np.asarray(image)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"expected an image [H, W, 3], got shape {np.shape(image)}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    a = a[..., :3]
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if np.issubdtype(a.dtype, np.integer):
        return np.clip(a.astype(np.float32) / 255, 0, 1)
    a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    if value_range is not None:
        lo, hi = value_range
        a = (a - lo) / max(hi - lo, 1e-12)
    elif float(a.max()) > 1.5:  # floats in 0-255
        a = a / 255
    elif float(a.min()) < -0.02:  # model outputs in [-1, 1]
        a = (a + 1) / 2
    return np.clip(a, 0, 1)


@functools.lru_cache(maxsize=16)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Design matrix [H*W, 3] for a plane (1, u, v) with u, v in [-0.5, 0.5], the cell id of every
    pixel [H, W] (row * 3 + column), and a border-ring mask [H, W]."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    design = np.stack([np.ones(h * w, np.float32), ((xs + 0.5) / w - 0.5).ravel(), ((ys + 0.5) / h - 0.5).ravel()], 1)
    rows = np.minimum(2, (3 * (ys + 0.5) / h).astype(np.int64))
    cols = np.minimum(2, (3 * (xs + 0.5) / w).astype(np.int64))
    ring = np.zeros((h, w), bool)
    k = max(1, min(h, w) // 32)
    ring[:k], ring[-k:], ring[:, :k], ring[:, -k:] = True, True, True, True
    return design, rows * 3 + cols, ring


def fit_background(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Robust plane fit of the background: (plane [H, W, 3], coefficients [3, 3], noise sigma).

    coefficients rows: value at the image centre, slope along x, slope along y (per channel, over
    the whole width/height). The fit runs on a strided subsample (~1-2k pixels: three parameters
    per channel need no more), then the plane is evaluated everywhere.
    """
    h, w, _ = img.shape
    design, _, ring = _grid(h, w)
    step = max(1, int(round(math.sqrt(h * w / 1024))))
    sub = np.zeros((h, w), bool)
    sub[step // 2::step, step // 2::step] = True
    sub = sub.ravel()
    a, flat = design[sub], img.reshape(-1, 3)[sub]
    coef = np.zeros((3, 3), np.float32)
    coef[0] = np.median(img[ring], axis=0)
    thr, sigma = 0.1, 0.0
    for _ in range(4):
        dist = np.sqrt(((flat - a @ coef) ** 2).sum(1))
        keep = dist < thr
        if keep.sum() < 8:
            break
        ak = a[keep]
        # A tiny ridge keeps the solve defined when the kept pixels are nearly collinear.
        gram = ak.T @ ak + np.eye(3, dtype=np.float32) * 1e-3
        coef = np.linalg.solve(gram, ak.T @ flat[keep]).astype(np.float32)
        resid = flat[keep] - ak @ coef
        # Per-channel noise from the median absolute residual; the next threshold adapts to it.
        sigma = float(np.median(np.abs(resid)) * 1.4826)
        thr = float(np.clip(6 * sigma * math.sqrt(3), 0.06, 0.2))
    return (design @ coef).reshape(h, w, 3), coef, sigma


def _colour_fit(d: np.ndarray, b: np.ndarray, palette: np.ndarray) -> tuple[int, np.ndarray]:
    """Best palette index for pixels explained as b + alpha * (c - b), and per-colour residuals.

    d = pixel - background [N, 3], b = background [N, 3], palette [K, 3].
    """
    v = palette[None, :, :] - b[:, None, :]  # [N, K, 3]
    vv = np.maximum((v * v).sum(-1), 1e-6)
    a = np.clip((d[:, None, :] * v).sum(-1) / vv, 0, 1)  # [N, K]
    r = ((d[:, None, :] - a[..., None] * v) ** 2).sum(-1).sum(0)  # [K]
    return int(np.argmin(r)), r


@functools.lru_cache(maxsize=16)
def _gauss_kernel(sigma: float) -> np.ndarray:
    r = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _distance(target: np.ndarray, template: np.ndarray, mass: float, sigmas=(0.0,)) -> tuple[float, float]:
    """(L1 distance relative to the object's mass, template blur used): the template is tried
    sharp and blurred, so a softened object matches its own shape rather than a rounder one."""
    best = (math.inf, 0.0)
    for sigma in sigmas:
        t = template
        if sigma > 0:
            k = _gauss_kernel(sigma)
            t = ndimage.correlate1d(ndimage.correlate1d(t, k, 0, mode="constant"), k, 1, mode="constant")
        best = min(best, (float(np.abs(target - t).sum()) / mass, sigma))
    return best


def _match_shape(alpha: np.ndarray, x0: int, y0: int) -> tuple[str, float, float, float, float]:
    """Best (shape, centre x, centre y, side, L1 score) for a coverage map with origin (x0, y0)."""
    h, w = alpha.shape
    mass = float(alpha.sum())
    ys, xs = np.mgrid[0:h, 0:w]
    mx = float((alpha * (xs + 0.5)).sum() / mass) + x0
    my = float((alpha * (ys + 0.5)).sum() / mass) + y0
    target = np.clip(alpha, 0, 1)
    scored = []
    for shape, (area, gx, gy) in UNIT_GEOMETRY.items():
        side = math.sqrt(mass / area)
        cx, cy = mx - gx * side, my - gy * side
        t = shape_coverage(shape, cx, cy, side, x0, y0, w, h)
        score, sigma = _distance(target, t, mass, (0.0,) + TEMPLATE_BLURS)
        scored.append((score, shape, cx, cy, side, sigma))
    scored.sort()
    best = scored[0]
    tiny = best[4] < TINY_SIDE
    offsets = _OFFSETS_FINE if tiny else _OFFSETS
    if tiny or scored[1][0] - best[0] <= REFINE_MARGIN:
        # Refine the two best hypotheses on a small grid of sides and offsets (at the blur each
        # matched best): the mass estimate is biased when alpha is noisy or blurred, and a
        # near-tie between shapes is then decided fairly.
        for _, shape, cx, cy, side, sigma in scored[:2]:
            for ds in (0.94, 1.0, 1.06):
                for ox, oy in offsets:
                    if ds == 1.0 and ox == 0 and oy == 0:
                        continue
                    t = shape_coverage(shape, cx + ox, cy + oy, side * ds, x0, y0, w, h)
                    score, _ = _distance(target, t, mass, (sigma,))
                    if score < best[0]:
                        best = (score, shape, cx + ox, cy + oy, side * ds, sigma)
    return best[1], best[2], best[3], best[4], best[0]


@functools.lru_cache(maxsize=64)
def _word_template(word: str, image_size: int) -> np.ndarray:
    """The coverage of a word as rendered at this image size, cropped to its bounding box."""
    cell = image_size / 3
    n = int(math.ceil(cell)) + 8
    t = text_coverage(word, n / 2, n / 2, text_font_px(image_size), 0, 0, n, n)
    ys, xs = np.nonzero(t > 0.3)
    if len(ys) == 0:
        return np.zeros((1, 1), np.float32)
    return t[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _read_word(alpha: np.ndarray, image_size: int) -> str | None:
    """The known word whose template best matches a text coverage map."""
    ys, xs = np.nonzero(alpha > 0.3)
    if len(ys) == 0:
        return None
    obs = np.clip(alpha[ys.min():ys.max() + 1, xs.min():xs.max() + 1], 0, 1)
    best, best_score = None, math.inf
    for word in vocab.TEXT_WORDS:
        t = _word_template(word, image_size)
        hh, ww = max(obs.shape[0], t.shape[0]) + 2, max(obs.shape[1], t.shape[1]) + 2
        a = np.zeros((hh, ww), np.float32)
        b = np.zeros((hh, ww), np.float32)
        # Centre both boxes on the same canvas; the word lengths differ by whole letters, so
        # a sub-pixel misalignment cannot change the winner.
        oy, ox = (hh - obs.shape[0]) // 2, (ww - obs.shape[1]) // 2
        a[oy:oy + obs.shape[0], ox:ox + obs.shape[1]] = obs
        oy, ox = (hh - t.shape[0]) // 2, (ww - t.shape[1]) // 2
        b[oy:oy + t.shape[0], ox:ox + t.shape[1]] = t
        score = float(np.abs(a - b).sum()) / max(float(b.sum()), 1e-6)
        if score < best_score:
            best, best_score = word, score
    return best


def _cell_candidates(labels: np.ndarray, n: int, cell_id: np.ndarray, min_part: int) -> dict[int, list]:
    """Per cell, the foreground pieces that may be its object: (pixel count, label, cell or -1).

    cell -1 means the whole component (it lies mostly in this cell); otherwise only the part of
    the component inside that cell (a component straddling cells, e.g. neighbours merged by blur).
    """
    counts = np.bincount((labels * 9 + cell_id).ravel(), minlength=(n + 1) * 9).reshape(n + 1, 9)
    cands: dict[int, list] = {}
    for lab in range(1, n + 1):
        row = counts[lab]
        total = int(row.sum())
        if total < min_part:
            continue
        k = int(row.argmax())
        if row[k] >= 0.75 * total:
            cands.setdefault(k, []).append((total, lab, -1))
        else:
            for k in np.nonzero(row >= min_part)[0]:
                cands.setdefault(int(k), []).append((int(row[k]), lab, int(k)))
    return cands


def parse_image(image, allow_text: bool | None = None, value_range: tuple[float, float] | None = None) -> Scene:
    """Recover the scene shown in an image [H, W, 3] (uint8, or float in [0, 1] or [-1, 1]).

    allow_text: look for written words (default: when H >= 96, as words are only rendered at
    128 px). value_range: the range of float inputs, e.g. (-1, 1); guessed when None (see
    `to_float_image`). The returned scene has jitter and gradient estimates filled in; compare
    scenes with `scene_equal` (facts), not ==.
    """
    img = to_float_image(image, value_range)
    h, w, _ = img.shape
    if allow_text is None:
        allow_text = min(h, w) >= _MIN_TEXT_SIZE
    plane, coef, sigma = fit_background(img)
    bg_index = int(np.argmin(((_BG_PALETTE - coef[0]) ** 2).sum(1)))
    background = _BG_NAMES[bg_index]
    gradient = bool(np.abs(coef[1:]).sum(0).max() / 2 > 0.02)
    if min(h, w) < 9:
        return Scene(background, gradient, ())

    diff = img - plane
    strength = np.sqrt((diff ** 2).sum(-1))
    fg_thr = float(np.clip(5 * sigma * math.sqrt(3), 0.14, 0.3))
    fg = strength > fg_thr
    labels, n = ndimage.label(fg, _STRUCT4)
    _, cell_id, _ = _grid(h, w)
    cell_area = (h / 3) * (w / 3)
    min_obj = max(2.0, 0.03 * cell_area)
    cands = _cell_candidates(labels, n, cell_id, min_part=2)
    text_rgb = np.asarray(vocab.TEXT_COLOURS[vocab.TEXT_COLOUR_FOR_BACKGROUND[background]], np.float32) / 255
    palette = np.concatenate([_PALETTE, text_rgb[None]]) if allow_text else _PALETTE

    def region(pieces):
        """Crop box, the pieces' own pixels and the same grown by the anti-aliased rim."""
        own = np.zeros((h, w), bool)
        for _, lab, cell in pieces:
            own |= (labels == lab) if cell < 0 else ((labels == lab) & (cell_id == cell))
        ys, xs = np.nonzero(own)
        y0, y1 = max(0, ys.min() - 3), min(h, ys.max() + 4)
        x0, x1 = max(0, xs.min() - 3), min(w, xs.max() + 4)
        own_c = own[y0:y1, x0:x1]
        grown = ndimage.binary_dilation(own_c, _STRUCT4, iterations=2) & ~(fg[y0:y1, x0:x1] & ~own_c)
        return (slice(y0, y1), slice(x0, x1)), own_c, grown

    def coverage(box, own_c, grown, ci):
        """Alpha of palette colour ci over the crop (zero outside the grown region)."""
        v = palette[ci][None, None, :] - plane[box]
        alpha = (diff[box] * v).sum(-1) / np.maximum((v * v).sum(-1), 1e-6)
        alpha = np.where(grown, alpha, 0.0).astype(np.float32)
        # Faint objects (a generator that blends the colour only part way): their coverage tops
        # out below 1, which would shrink the size estimate and soften every template match.
        # Blur alone leaves the peak near 1 for all but the tiniest objects, so only a clearly
        # low peak is rescaled.
        level = float(np.percentile(alpha[own_c], 90)) if own_c.any() else 1.0
        return alpha / level if 0.2 < level < FAINT_LEVEL else alpha

    objects = []  # (cell, shape, colour, cx, cy, side)
    text = text_place = None
    for k in sorted(cands):
        pieces = sorted(cands[k], reverse=True)
        # One object per cell: its largest piece. Only a word is made of several small pieces.
        if pieces[0][0] >= min_obj:
            use = pieces[:1]
        elif allow_text and sum(p[0] for p in pieces) >= 0.01 * cell_area:
            use = pieces
        else:
            continue
        box, own_c, grown = region(use)
        ci, _ = _colour_fit(diff[box][grown], plane[box][grown], palette)
        row, col = divmod(k, 3)
        if ci == len(_PALETTE):  # the text colour: read the word from all pieces of the cell
            if text is None:
                box, own_c, grown = region(pieces)
                text = _read_word(coverage(box, own_c, grown, ci), h)
                text_place = vocab.CELL_PLACES[(row, col)]
            continue
        alpha = coverage(box, own_c, grown, ci)
        if float(alpha.sum()) < min_obj:
            continue
        shape, cx, cy, side, _ = _match_shape(alpha, box[1].start, box[0].start)
        objects.append((k, shape, _COLOUR_NAMES[ci], cx, cy, side))

    return _assemble(objects, background, gradient, coef, text, text_place, h, w)


def _assemble(objects, background, gradient, coef, text, text_place, h, w) -> Scene:
    """Group objects by (colour, shape) into a valid Scene, main subject first."""
    cell_w, cell_h = w / 3, h / 3
    by_key: dict[tuple[str, str], list] = {}
    for k, shape, colour, cx, cy, side in objects:
        by_key.setdefault((colour, shape), []).append((k, cx, cy, side))
    groups = []
    for (colour, shape), objs in by_key.items():
        objs.sort()
        rel = [side / math.sqrt(cell_w * cell_h) for _, _, _, side in objs]
        n_large = sum(r > _SIZE_SPLIT for r in rel)
        if 2 * n_large != len(rel):
            size = "large" if 2 * n_large > len(rel) else "small"
        else:
            size = "large" if float(np.mean(rel)) > _SIZE_SPLIT else "small"
        places, jitter = [], []
        for (k, cx, cy, side), r in zip(objs, rel):
            row, col = divmod(k, 3)
            places.append(vocab.CELL_PLACES[(row, col)])
            jitter.append((round(cx / cell_w - col - 0.5, 4), round(cy / cell_h - row - 0.5, 4),
                           round(r / vocab.SIZE_FRACTION[size], 4)))
        groups.append(Group(shape, colour, size, tuple(places), tuple(jitter)))
    groups.sort(key=lambda g: (-g.weight, vocab.PLACES.index(g.places[0])))
    amount = float(np.abs(coef[1:]).sum(0).max() / 2) if gradient else 0.0
    angle = float(math.atan2(float(coef[2].mean()), float(coef[1].mean()))) if gradient else 0.0
    return Scene(background, gradient, tuple(groups), text, round(angle, 4), round(amount, 4),
                 text_place if text is not None else None)
