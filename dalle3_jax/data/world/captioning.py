"""Caption generators: descriptive and short ground truth, and web-like alt text.

- descriptive: every group (count, size, colour, shape, every place), the background and any
  written word, in varied templates, orders and synonyms. Every phrasing belongs to the grammar
  that `caption_parser.parse_caption` reads, so parse(descriptive) == scene_facts exactly.
  Grammar contract the parser relies on: each clause (split at . ; ! ? and "while") names at most
  one shape noun; count, size and colour come before the noun; a clause with no noun refers to the
  last noun ("They are small and sit at the top"); the background is named next to the word
  background/backdrop/gradient; a written word is quoted.
- short: the main subject only, "three blue squares" / "a red circle".
- alt: what a scraped dataset carries (bare nouns, wrong attributes, unrelated strings, partly
  right captions, sometimes a correct short caption), with rates from WorldConfig.
"""

from __future__ import annotations

import numpy as np

from dalle3_jax.data.world import vocab
from dalle3_jax.data.world.scene import Group, Scene, WorldConfig

# Quantifiers by count; "a" is replaced by the right article for the next word.
_COUNT_PHRASES: dict[int, tuple[str, ...]] = {
    1: ("a", "a", "one", "a single"),
    2: ("two", "two", "a pair of"),
    3: ("three",),
    4: ("four",),
}
_SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "small", "little", "tiny"), "large": ("large", "large", "big")}
_BG_WORDS: dict[str, tuple[str, ...]] = {"gray": ("gray", "grey")}

# Place phrases with their preposition, and bare noun phrases for lists ("at the top and the center").
_CORNER = {"top left": ("top left", "upper left"), "top right": ("top right", "upper right"),
           "bottom left": ("bottom left", "lower left"), "bottom right": ("bottom right", "lower right")}
_PLACE_PHRASES: dict[str, tuple[str, ...]] = {
    **{p: (f"in the {syn[0]} corner", f"at the {syn[0]}", f"in the {syn[0].replace(' ', '-')} corner",
           f"in the {syn[1]} corner", f"at the {syn[1]}") for p, syn in _CORNER.items()},
    "top": ("at the top", "at the top center", "in the top middle", "near the top"),
    "bottom": ("at the bottom", "at the bottom center", "in the bottom middle", "near the bottom"),
    "left": ("on the left", "on the left side", "at the middle left", "at the center left"),
    "right": ("on the right", "on the right side", "at the middle right", "at the center right"),
    "center": ("in the center", "in the middle", "at the center", "in the very center"),
}
_PLACE_BARE: dict[str, tuple[str, ...]] = {
    **{p: (f"the {syn[0]} corner", f"the {syn[0]}", f"the {syn[1]} corner") for p, syn in _CORNER.items()},
    "top": ("the top", "the top center"), "bottom": ("the bottom", "the bottom center"),
    "left": ("the left side", "the left edge"), "right": ("the right side", "the right edge"),
    "center": ("the center", "the middle"),
}

# Alt-text material. None of these strings may contain a word the caption parser knows.
_BARE_GENERIC = ("shapes", "image", "picture", "geometric shapes", "abstract art", "pattern", "graphic",
                 "icon", "clip art", "untitled", "illustration", "design", "art")
_UNRELATED = (
    "IMG_{n4}.JPG", "DSC{n5}.jpg", "screenshot_{n4}.png", "untitled-{n2}.png", "photo {n4}",
    "Buy now and save {n2}%!", "Free shipping on all orders", "Click here to subscribe",
    "stock photo, royalty free", "when the code compiles on the first try", "me on monday morning",
    "Best deals of the year", "wallpaper HD download", "logo design template", "Lorem ipsum dolor sit amet",
    "Happy birthday!", "new arrivals", "thumbnail", "banner ad {n2}", "hello world", "my cat ate my homework",
    "sponsored", "limited offer ends soon", "vector illustration set", "nobody: / absolutely nobody:",
)
_STOCK_SUFFIX = ("", "", "", " - stock image", " vector", " clipart", ".png", " icon")


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def count_word(count: int, next_word: str) -> str:
    """Canonical quantifier used by short captions: 'a'/'an' for one, else the number word."""
    return vocab.article(next_word) if count == 1 else vocab.NUMBER_WORDS[count]


def short_caption(scene: Scene) -> str:
    """The main subject only: count, colour, shape ("three blue squares", "an orange star")."""
    g = scene.main_subject
    if g is None:
        return vocab.article(scene.background) + f" {scene.background} background"
    return f"{count_word(g.count, g.colour)} {g.colour} {vocab.plural(g.shape, g.count)}"


def _noun_phrase(rng: np.random.Generator, g: Group, with_size: bool = True) -> str:
    q = _pick(rng, _COUNT_PHRASES[g.count])
    words = ([_pick(rng, _SIZE_WORDS[g.size])] if with_size else []) + [g.colour, vocab.plural(g.shape, g.count)]
    if q in ("a", "an"):
        q = vocab.article(words[0])
    return " ".join([q] + words)


def _place_list(rng: np.random.Generator, places: tuple[str, ...], bare: bool = False, leading: bool = False,
                compact: bool = False) -> str:
    """All places of a group, each exactly once, in reading or shuffled order.

    bare: noun phrases without prepositions ("the top and the center"); leading: the list opens
    the sentence, where "one at the top and one ..." would read badly; compact: only the short
    list styles (keeps captions of busy scenes under ~60 words).
    """
    order = list(places)
    if len(order) > 1 and rng.random() < 0.5:
        order = [order[i] for i in rng.permutation(len(order))]
    table = _PLACE_BARE if bare else _PLACE_PHRASES
    parts = [_pick(rng, table[p]) for p in order]
    if len(parts) == 1:
        return parts[0]
    style = 0 if bare else _pick(rng, (0, 3) if compact else (0, 1, 2, 3))
    if style == 1 and not leading:  # "one at the top and one in the center"
        return " and ".join("one " + p for p in parts) if len(parts) == 2 else \
            ", ".join("one " + p for p in parts[:-1]) + " and one " + parts[-1]
    if style == 2 and len(parts) == 2:
        return f"{parts[0]} as well as {parts[1]}"
    if style == 3:  # only the first keeps its preposition
        rest = [_pick(rng, _PLACE_BARE[p]) for p in order[1:]]
        parts = parts[:1] + rest
    serial = len(parts) > 2 and rng.random() < 0.3  # the Oxford comma, only in lists of three or more
    return ", ".join(parts[:-1]) + (", and " if serial else " and ") + parts[-1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _group_clauses(rng: np.random.Generator, g: Group, first: bool, compact: bool) -> list[str]:
    """One or two clauses (no final punctuation) that state everything about a group.

    compact (busy scenes): no two-sentence form and no opener, so long scenes stay short.
    """
    many = g.count > 1
    be, sit, appear, occupy = ("are", "sit", "appear", "occupy") if many else ("is", "sits", "appears", "occupies")
    np_ = _noun_phrase(rng, g)
    t = int(rng.integers(7 if compact else 9 if first else 8))
    pl = _place_list(rng, g.places, leading=t in (1, 2), compact=compact)
    if t == 0:
        return [f"There {be} {np_} {pl}"]
    if t == 1:
        return [f"{_cap(pl)}, there {be} {np_}"]
    if t == 2:
        return [f"{_cap(pl)} {_pick(rng, (sit, appear))} {np_}"]
    if t == 3:
        return [f"{_cap(np_)} {be} {pl}"]
    if t == 4:
        return [f"{_cap(np_)} {_pick(rng, (sit, appear, 'can be seen'))} {pl}"]
    if t == 5:
        return [f"You can see {np_} {pl}"]
    if t == 6:
        return [f"{_cap(np_)} {occupy} {_place_list(rng, g.places, bare=True)}"]
    if t == 7:  # size stated in a second, noun-less clause that refers back
        np_nosize = _noun_phrase(rng, g, with_size=False)
        size = _pick(rng, _SIZE_WORDS[g.size])
        pron = "They are" if many else "It is"
        return [f"There {be} {np_nosize}", f"{pron} {size} and {sit} {pl}"]
    return [f"{_pick(rng, ('The image shows', 'This picture contains', 'We see'))} {np_} {pl}"]


def _background_clause(rng: np.random.Generator, scene: Scene) -> tuple[str, str]:
    """A stand-alone background clause, and a phrase to append to another clause instead."""
    bg = _pick(rng, _BG_WORDS.get(scene.background, (scene.background,)))
    if scene.gradient and rng.random() < 0.7:
        clause = _pick(rng, (f"The background is a {_pick(rng, ('soft', 'gentle', 'subtle'))} {bg} gradient",
                             f"Everything sits on a {bg} gradient background",
                             f"The backdrop is a {bg} gradient"))
        return clause, f"on a {bg} gradient background"
    clause = _pick(rng, (f"The background is {bg}", f"The background is plain {bg}",
                         f"Everything sits on a {bg} background", f"The backdrop is {bg}",
                         f"All of this is set against a {bg} backdrop", f"The whole image has a {bg} background"))
    return clause, _pick(rng, (f"on a {bg} background", f"against a {bg} backdrop"))


def _text_clause(rng: np.random.Generator, scene: Scene, first: bool) -> str:
    colour = vocab.TEXT_COLOUR_FOR_BACKGROUND[scene.background]
    w = scene.text
    options = (f'The word "{w}" is written in {colour}', f'There is the word "{w}" in {colour} letters',
               f'{_cap(colour)} text reads "{w}"', f'It also says "{w}" in {colour}')
    return _pick(rng, options[:3] if first else options)


def descriptive_caption(scene: Scene, rng: np.random.Generator) -> str:
    """Every fact of the scene in one of many phrasings (about 15-60 words)."""
    order = list(range(len(scene.groups)))
    if len(order) > 1 and rng.random() < 0.5:  # usually the main subject first, as people write
        order = [order[i] for i in rng.permutation(len(order))]
    compact = len(scene.groups) >= 3
    blocks = [_group_clauses(rng, scene.groups[k], i == 0, compact) for i, k in enumerate(order)]
    bg_clause, bg_inline = _background_clause(rng, scene)
    r = rng.random()
    if r < 0.2 and blocks:
        # Inline: "... at the top on a gray background".
        blocks[-1] = blocks[-1][:-1] + [blocks[-1][-1] + " " + bg_inline]
    else:
        pos = 0 if r < 0.45 else len(blocks) if r < 0.9 else int(rng.integers(len(blocks) + 1))
        blocks.insert(pos, [bg_clause])
    if scene.text is not None:
        pos = int(rng.integers(len(blocks) + 1))
        blocks.insert(pos, [_text_clause(rng, scene, first=pos == 0)])
    clauses = [c for b in blocks for c in b]
    out = _cap(clauses[0])
    for c in clauses[1:]:
        j = rng.random()
        # Pronoun clauses ("They are small ...") always start a new sentence, for readability.
        if j < 0.2 and not c.startswith(("It ", "They ")):
            out += ("; " if j < 0.12 else ", while ") + c[0].lower() + c[1:]
        else:
            out += ". " + c
    return out + "."


def _wrong(rng: np.random.Generator, g: Group) -> str:
    """A short caption with exactly one of colour, count or shape changed."""
    colour, count, shape = g.colour, g.count, g.shape
    which = int(rng.integers(3))
    if which == 0:
        colour = _pick(rng, tuple(c for c in vocab.COLOURS if c != g.colour))
    elif which == 1:
        count = _pick(rng, tuple(n for n in range(1, 5) if n != g.count))
    else:
        shape = _pick(rng, tuple(s for s in vocab.SHAPES if s != g.shape))
    return f"{count_word(count, colour)} {colour} {vocab.plural(shape, count)}"


def _partial(rng: np.random.Generator, g: Group) -> str:
    """Partly right: the shape without its colour, the colour with a wrong count, or colour only."""
    mode = int(rng.integers(4))
    if mode == 0:
        return f"{count_word(g.count, g.shape)} {vocab.plural(g.shape, g.count)}"
    if mode == 1:
        n = _pick(rng, tuple(k for k in range(1, 5) if k != g.count))
        return f"{count_word(n, g.colour)} {g.colour} {vocab.plural(g.shape, n)}"
    if mode == 2:
        return f"{g.colour} {vocab.SHAPE_PLURALS[g.shape]}"
    return f"{g.colour} {_pick(rng, ('shapes', 'things', 'objects', 'design'))}"


def _unrelated(rng: np.random.Generator) -> str:
    s = _pick(rng, _UNRELATED)
    return s.format(n2=int(rng.integers(10, 100)), n4=int(rng.integers(1000, 10000)), n5=int(rng.integers(10000, 100000)))


def alt_caption(scene: Scene, rng: np.random.Generator, config: WorldConfig | None = None) -> str:
    """Web-like alt text; the mode is drawn with the config's rates."""
    cfg = config or WorldConfig()
    g = scene.main_subject
    r = rng.random()
    edges = np.cumsum([cfg.alt_bare_rate, cfg.alt_wrong_rate, cfg.alt_unrelated_rate, cfg.alt_partial_rate])
    if g is None or r < edges[0]:
        if g is not None and rng.random() < 0.5:
            return _pick(rng, (g.shape, vocab.SHAPE_PLURALS[g.shape]))
        return _pick(rng, _BARE_GENERIC)
    if r < edges[1]:
        return _wrong(rng, g)
    if r < edges[2]:
        return _unrelated(rng)
    if r < edges[3]:
        return _partial(rng, g)
    return short_caption(scene) + _pick(rng, _STOCK_SUFFIX)


def captions(scene: Scene, rng: np.random.Generator, config: WorldConfig | None = None,
             alt_rng: np.random.Generator | None = None) -> dict[str, str]:
    """{"descriptive", "short", "alt"} for a scene; deterministic given the generators' states.

    alt_rng: a separate stream for the alt text (so editing descriptive templates leaves alt text
    unchanged); defaults to rng.
    """
    return {"descriptive": descriptive_caption(scene, rng), "short": short_caption(scene),
            "alt": alt_caption(scene, rng if alt_rng is None else alt_rng, config)}
