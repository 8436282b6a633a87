"""Scenes of the shapes world: the data model, the sampler, the splits and the facts.

A scene is a background plus 1-4 groups of identical objects on a 3x3 grid (one object per cell at
most, so objects never overlap), and optionally one written word. Scenes are sampled
deterministically from (seed, split, index).

Facts (the shared definition every evaluation uses)
---------------------------------------------------
A fact is a tuple; the facts of a scene are a frozenset of them:

- ("shape", shape)                      some object of this shape is present
- ("colour", shape, colour)             a <colour> <shape> is present
- ("count", shape, colour, n)           the group of <colour> <shape>s has n objects
- ("size", shape, colour, size)         that group's objects are "small" or "large"
- ("place", shape, colour, place)       one per object: a <colour> <shape> sits in that grid cell
- ("background", name)                  the background colour name (a gradient does not change it)
- ("text", word)                        the word is written in the image

Groups in a scene have distinct (colour, shape) pairs, so (shape, colour) identifies a group.
Layout details that no caption states (jitter of position and size, gradient direction, where the
text sits) are stored in the scene so rendering is a pure function of it, but they are not facts;
two scenes are "equal" for evaluation when their facts are equal (see `scene_equal`).

Splits
------
The space of scenes is partitioned by a stable hash (BLAKE2b) of the canonical facts into 100
buckets: `train` and `finetune` draw scenes from buckets [0, 80), `eval` from [80, 90) and `judge`
from [90, 100), by rejection sampling. So no eval scene (as a set of facts) ever appears in
training or in the judge's data, and for one-object scenes the held-out attribute combinations
appear only in eval.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math

import numpy as np

from dalle3_jax.data.world import vocab

Fact = tuple

SPLITS: tuple[str, ...] = ("train", "finetune", "eval", "judge")
# Stream ids for the seed sequence; fixed forever so example i never changes.
SPLIT_ID: dict[str, int] = {"train": 0, "finetune": 1, "eval": 2, "judge": 3}
# Hash buckets (out of 100) that each split may draw scenes from.
SPLIT_BUCKETS: dict[str, range] = {
    "train": range(0, 80),
    "finetune": range(0, 80),
    "eval": range(80, 90),
    "judge": range(90, 100),
}
_MAX_TRIES = 10_000  # rejection-sampling guard; an eval scene needs ~10 draws on average


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Everything that defines the shapes world. Two machines with equal configs see equal data."""

    seed: int = 0  # root seed; with (split, index) it fixes every scene and caption
    image_size: int = 64  # H = W of rendered images; 32, 64 and 128 are supported
    min_groups: int = 1  # fewest groups of identical objects in a scene
    max_groups: int = 4  # most groups in a scene
    max_count: int = 4  # most objects in one group
    max_objects: int = 6  # most objects in a scene (9 cells; fewer keeps scenes legible)
    single_object: bool = False  # if True every scene holds exactly one object (quick pipeline slice)
    gradient_prob: float = 0.3  # chance that the background is a gentle linear gradient
    text_prob: float = 0.0  # chance of one written word (only when image_size >= 128)
    # Alt-text modes (web-like captions); they must sum to <= 1, the rest is a correct short caption.
    alt_bare_rate: float = 0.35  # a bare noun: "circle", "shapes", "image"
    alt_wrong_rate: float = 0.15  # a short caption with the colour, count or shape wrong
    alt_unrelated_rate: float = 0.2  # ads, file names, memes, stock-photo text
    alt_partial_rate: float = 0.15  # partly right: shape without colour, right colour wrong count
    # Split lengths: how many indices are valid in each split.
    train_size: int = 1_000_000  # alt-text "web" data for captioner pretraining and T2I training
    finetune_size: int = 10_000  # the small human-labelled set (short and descriptive captions)
    eval_size: int = 5_000  # held-out scenes for prompt following and caption quality
    judge_size: int = 20_000  # disjoint scenes that only train the evaluation CLIP

    def __post_init__(self):
        if self.image_size < 24:
            raise ValueError(f"image_size must be >= 24, got {self.image_size}")
        if not 1 <= self.min_groups <= self.max_groups:
            raise ValueError("need 1 <= min_groups <= max_groups")
        if not 1 <= self.max_count <= 9 or not 1 <= self.max_objects <= 9:
            raise ValueError("max_count and max_objects must lie in [1, 9]")
        if self.min_groups > self.max_objects:
            raise ValueError("min_groups exceeds max_objects")
        rates = (self.alt_bare_rate, self.alt_wrong_rate, self.alt_unrelated_rate, self.alt_partial_rate)
        if min(rates) < 0 or sum(rates) > 1 + 1e-9:
            raise ValueError(f"alt rates must be >= 0 and sum to <= 1, got {rates}")

    def split_size(self, split: str) -> int:
        """The number of valid indices in a split."""
        if split not in SPLIT_ID:
            raise KeyError(f"unknown split {split!r}; expected one of {SPLITS}")
        return getattr(self, f"{split}_size")


@dataclasses.dataclass(frozen=True)
class Group:
    """Identical objects: count = len(places), one object per grid cell.

    jitter[i] = (dx, dy, scale) for the object at places[i]: the offset of its centre from the cell
    centre in cell units and its size multiplier; empty means every object sits centred, nominal.
    """

    shape: str
    colour: str
    size: str
    places: tuple[str, ...]
    jitter: tuple[tuple[float, float, float], ...] = ()

    def __post_init__(self):
        if self.shape not in vocab.SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.colour not in vocab.COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}")
        if self.size not in vocab.SIZES:
            raise ValueError(f"unknown size {self.size!r}")
        if not self.places or len(set(self.places)) != len(self.places):
            raise ValueError(f"places must be non-empty and distinct, got {self.places}")
        if any(p not in vocab.PLACE_CELLS for p in self.places):
            raise ValueError(f"unknown place in {self.places}")
        if self.jitter and len(self.jitter) != len(self.places):
            raise ValueError("jitter must be empty or have one entry per place")

    @property
    def count(self) -> int:
        return len(self.places)

    @property
    def weight(self) -> float:
        """Visual weight used to pick the main subject: count * nominal area."""
        return self.count * vocab.SIZE_AREA[self.size]


@dataclasses.dataclass(frozen=True)
class Scene:
    """A background, groups (groups[0] is the main subject) and an optional written word.

    gradient_angle (radians) and gradient_amount (half-range in [0, 1] intensity) shape the linear
    background gradient when gradient is True; text_place and text_jitter (dx, dy in cell units)
    position the word.
    """

    background: str
    gradient: bool
    groups: tuple[Group, ...]
    text: str | None = None
    gradient_angle: float = 0.0
    gradient_amount: float = 0.0
    text_place: str | None = None
    text_jitter: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self):
        if self.background not in vocab.BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}")
        pairs = [(g.colour, g.shape) for g in self.groups]
        if len(set(pairs)) != len(pairs):
            raise ValueError("groups must have distinct (colour, shape) pairs")
        cells = [p for g in self.groups for p in g.places]
        if self.text is not None and self.text_place is not None:
            cells.append(self.text_place)
        if len(set(cells)) != len(cells):
            raise ValueError("two objects share a grid cell")

    @property
    def main_subject(self) -> Group | None:
        return self.groups[0] if self.groups else None

    @property
    def n_objects(self) -> int:
        return sum(g.count for g in self.groups)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str) -> "Scene":
        d = json.loads(s)
        groups = tuple(
            Group(shape=g["shape"], colour=g["colour"], size=g["size"], places=tuple(g["places"]),
                  jitter=tuple(tuple(j) for j in g.get("jitter", ())))
            for g in d["groups"]
        )
        return cls(background=d["background"], gradient=bool(d["gradient"]), groups=groups,
                   text=d.get("text"), gradient_angle=float(d.get("gradient_angle", 0.0)),
                   gradient_amount=float(d.get("gradient_amount", 0.0)), text_place=d.get("text_place"),
                   text_jitter=tuple(d.get("text_jitter", (0.0, 0.0))))


def scene_facts(scene: Scene) -> frozenset:
    """The facts of a scene (see the module docstring)."""
    facts = {("background", scene.background)}
    for g in scene.groups:
        facts.add(("shape", g.shape))
        facts.add(("colour", g.shape, g.colour))
        facts.add(("count", g.shape, g.colour, g.count))
        facts.add(("size", g.shape, g.colour, g.size))
        facts.update(("place", g.shape, g.colour, p) for p in g.places)
    if scene.text is not None:
        facts.add(("text", scene.text))
    return frozenset(facts)


def scene_equal(a: Scene, b: Scene) -> bool:
    """Equality for evaluation: same facts (layout jitter and gradient are ignored)."""
    return scene_facts(a) == scene_facts(b)


def fact_bucket(facts: frozenset) -> int:
    """A stable bucket in [0, 100) from the canonical facts (never Python's salted hash())."""
    canonical = "|".join(sorted("/".join(str(x) for x in f) for f in facts))
    digest = hashlib.blake2b(canonical.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 100


def scene_rngs(seed: int, split: str, index: int) -> tuple[np.random.Generator, ...]:
    """Independent generators (scene, captions, alt text) for one example.

    Separate streams mean a change to the caption templates never changes the scenes.
    """
    if split not in SPLIT_ID:
        raise KeyError(f"unknown split {split!r}; expected one of {SPLITS}")
    ss = np.random.SeedSequence([int(seed), SPLIT_ID[split], int(index)])
    return tuple(np.random.default_rng(s) for s in ss.spawn(3))


@functools.lru_cache(maxsize=None)
def _count_tuples(n_groups: int, max_count: int, max_objects: int) -> tuple[tuple[int, ...], ...]:
    """Every tuple of group counts allowed by the limits (drawn uniformly: no rejection loop)."""
    return tuple(c for c in itertools.product(range(1, max_count + 1), repeat=n_groups)
                 if sum(c) <= max_objects)


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return round(float(rng.uniform(lo, hi)), 4)


def _object_jitter(rng: np.random.Generator, size: str) -> tuple[float, float, float]:
    """(dx, dy, scale) that keeps the object inside its cell with a margin."""
    scale = _uniform(rng, 1 - vocab.SIZE_JITTER, 1 + vocab.SIZE_JITTER)
    side = vocab.SIZE_FRACTION[size] * scale
    # A margin of 4% of the cell on every side keeps neighbours apart; 0.15 caps the wander so
    # small objects stay recognisably "in" their cell.
    room = max(0.0, min(0.15, (1.0 - side) / 2 - 0.04))
    return (_uniform(rng, -room, room), _uniform(rng, -room, room), scale)


def _draw_scene(rng: np.random.Generator, cfg: WorldConfig) -> Scene | None:
    """One unconstrained draw; None when no group dominates (a tie for the main subject)."""
    if cfg.single_object:
        counts = (1,)
    else:
        hi = min(cfg.max_groups, cfg.max_objects, len(vocab.COLOURS) * len(vocab.SHAPES))
        n_groups = int(rng.integers(cfg.min_groups, hi + 1))
        options = _count_tuples(n_groups, cfg.max_count, cfg.max_objects)
        counts = options[int(rng.integers(len(options)))]
    n_groups = len(counts)
    colours = tuple(vocab.COLOURS)
    pairs = rng.choice(len(colours) * len(vocab.SHAPES), size=n_groups, replace=False)
    sizes = rng.integers(0, len(vocab.SIZES), size=n_groups)
    cells = rng.permutation(len(vocab.PLACES))
    groups, start = [], 0
    for k, count in enumerate(counts):
        colour, shape = colours[int(pairs[k]) // len(vocab.SHAPES)], vocab.SHAPES[int(pairs[k]) % len(vocab.SHAPES)]
        size = vocab.SIZES[int(sizes[k])]
        places = tuple(vocab.PLACES[i] for i in sorted(int(c) for c in cells[start:start + count]))
        start += count
        jitter = tuple(_object_jitter(rng, size) for _ in places)
        groups.append(Group(shape, colour, size, places, jitter))
    background = tuple(vocab.BACKGROUNDS)[int(rng.integers(len(vocab.BACKGROUNDS)))]
    gradient = bool(rng.random() < cfg.gradient_prob)
    angle = _uniform(rng, 0.0, 2 * math.pi) if gradient else 0.0
    amount = _uniform(rng, 0.04, 0.1) if gradient else 0.0
    text = text_place = None
    text_jitter = (0.0, 0.0)
    # Drawn last and only when possible, so text-free configs see the same scenes at every size.
    if cfg.text_prob > 0 and cfg.image_size >= 128 and start < len(vocab.PLACES):
        if rng.random() < cfg.text_prob:
            text = vocab.TEXT_WORDS[int(rng.integers(len(vocab.TEXT_WORDS)))]
            text_place = vocab.PLACES[int(cells[start])]
            text_jitter = (_uniform(rng, -0.05, 0.05), _uniform(rng, -0.12, 0.12))
    # The main subject is the group with the most visual weight; a tie would make the short
    # caption ambiguous, so such draws are rejected.
    groups.sort(key=lambda g: -g.weight)
    if len(groups) > 1 and math.isclose(groups[0].weight, groups[1].weight):
        return None
    return Scene(background, gradient, tuple(groups), text, angle, amount, text_place, text_jitter)


def sample_scene(rng: np.random.Generator, cfg: WorldConfig, split: str) -> Scene:
    """Draw scenes until one falls in the split's hash buckets."""
    buckets = SPLIT_BUCKETS[split]
    for _ in range(_MAX_TRIES):
        scene = _draw_scene(rng, cfg)
        if scene is not None and fact_bucket(scene_facts(scene)) in buckets:
            return scene
    raise RuntimeError(f"no {split} scene found in {_MAX_TRIES} draws; is the config too narrow?")
