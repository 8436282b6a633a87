"""The closed vocabulary of the shapes world: shapes, colours, backgrounds, sizes, places, words.

Everything that a caption may state and the scene parser may recover is named here, once, so the
renderer, the caption generator and both parsers cannot drift apart.

Coordinates: a scene is laid on a 3x3 grid of equal cells; a place names one cell. Sizes are given
as the side of the object's bounding box in units of the cell side (so they do not depend on the
image size H x W).
"""

from __future__ import annotations

# Shapes, in a fixed order (the order is part of the scene-sampling stream: do not reorder).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")

# Plural nouns; "cross" is the only irregular one.
SHAPE_PLURALS: dict[str, str] = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}

# Object colours (sRGB, 0-255). Chosen far apart from each other (>= ~85 in RGB distance) and from
# every background (>= ~90), so a nearest-colour rule survives blur, noise and mild tints.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 225, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 220),
    "blue": (40, 70, 220),
    "purple": (140, 50, 190),
    "pink": (245, 120, 190),
}

# Background colours: achromatic or nearly so, so that no background can be mistaken for an
# object colour. A background may carry a gentle linear gradient; its name does not change.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "gray": (115, 115, 115),
    "white": (240, 240, 240),
    "beige": (215, 200, 160),
}

# Rendered text is drawn in the achromatic colour that contrasts with the background; captions
# name it ("written in white"). It is never an object colour, so the parser tells text from shapes
# by colour alone.
TEXT_COLOUR_FOR_BACKGROUND: dict[str, str] = {
    "black": "white",
    "gray": "white",
    "white": "black",
    "beige": "black",
}
TEXT_COLOURS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "black": (15, 15, 15)}

# Words that may be written in a scene (short, so they fit one cell at 128 px).
TEXT_WORDS: tuple[str, ...] = ("sun", "cat", "hello", "sale", "moon", "love", "yes", "stop", "tree", "joy")

SIZES: tuple[str, ...] = ("small", "large")

# Nominal bounding-box side of an object, as a fraction of the cell side; each object is jittered
# by SIZE_JITTER around it. The two sizes are far apart so the parser separates them by area.
SIZE_FRACTION: dict[str, float] = {"small": 0.5, "large": 0.82}
SIZE_JITTER = 0.06
# Relative area used to decide which group dominates a scene (count * area).
SIZE_AREA: dict[str, float] = {k: v * v for k, v in SIZE_FRACTION.items()}

# The 3x3 grid, in reading order. "center" is spelled this way everywhere in code.
PLACES: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
# place -> (row, column) on the grid.
PLACE_CELLS: dict[str, tuple[int, int]] = {p: divmod(i, 3) for i, p in enumerate(PLACES)}
CELL_PLACES: dict[tuple[int, int], str] = {rc: p for p, rc in PLACE_CELLS.items()}

# Number words used by captions (the caption parser also accepts digits and a few more forms).
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six",
                                7: "seven", 8: "eight", 9: "nine"}


def article(word: str) -> str:
    """The indefinite article for a word ("an orange", "a red")."""
    return "an" if word[:1] in "aeiou" else "a"


def plural(shape: str, count: int) -> str:
    """The shape noun in the number that agrees with count."""
    return shape if count == 1 else SHAPE_PLURALS[shape]
