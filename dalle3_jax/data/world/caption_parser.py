"""Caption text -> the set of facts it claims (see `scene` for the fact definitions).

The parser reads the grammar of the generated captions exactly, and anything close to it
(other word orders, model-garbled text) on a best-effort basis: it extracts what is clearly
stated and ignores the rest. It never raises, whatever the input.

How it reads a caption:
1. Lowercase and tokenise into words, numbers, quoted single words ("sun") and clause
   boundaries (. ; ! ? newline, "while", "whereas", "meanwhile"); drop immediate repeats.
2. In each clause, every shape noun ("circles", "star", "rhombus") starts a mention. Its noun
   phrase is read right-to-left from the noun: colour and size words, harmless modifiers and at
   most one unknown word (e.g. "shiny"), ending at a quantifier ("a", "two", "a pair of").
   Vague quantifiers ("several") give no count; "no"/"zero" cancels the mention.
3. Place phrases ("top left", "upper left corner", "center right", "the middle") attach to the
   nearest noun of the clause; in a clause without a noun they refer back to the last noun
   ("They are small and sit at the top"), and so do stray size or colour words.
4. The background is the background colour word nearest to background/backdrop/gradient in a
   clause containing one of those words. A quoted single word, or "the word X" with X a known
   word, claims ("text", X).
A mention without a colour claims only ("shape", s): counts, sizes and places are facts about a
(colour, shape) group.
"""

from __future__ import annotations

import bisect
import re

from dalle3_jax.data.world import vocab
from dalle3_jax.data.world.scene import Scene, scene_facts

_SHAPE_NOUNS: dict[str, str] = {}
for _s in vocab.SHAPES:
    _SHAPE_NOUNS[_s] = _s
    _SHAPE_NOUNS[vocab.SHAPE_PLURALS[_s]] = _s
_SHAPE_NOUNS.update({"disc": "circle", "discs": "circle", "disk": "circle", "disks": "circle",
                     "rhombus": "diamond", "rhombuses": "diamond", "rhombi": "diamond"})
_PLURAL_NOUNS = {w for w in _SHAPE_NOUNS if w.endswith("s") and w not in ("rhombus", "cross")} | {"rhombi"}

_COLOUR_WORDS: dict[str, str] = {c: c for c in vocab.COLOURS}
_COLOUR_WORDS.update({"violet": "purple", "turquoise": "cyan"})
_BG_WORDS: dict[str, str] = {b: b for b in vocab.BACKGROUNDS}
_BG_WORDS["grey"] = "gray"
_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small",
               "large": "large", "big": "large", "huge": "large", "giant": "large"}
_NUMBERS: dict[str, int] = {w: n for n, w in vocab.NUMBER_WORDS.items()}
_NUMBERS.update({str(n): n for n in range(10)})
_NUMBERS.update({"a": 1, "an": 1, "zero": 0, "no": 0})
_COLLECTIVE = {"pair": 2, "couple": 2, "trio": 3, "quartet": 4}
_VAGUE = {"few", "several", "many", "some", "multiple", "various", "numerous", "lots", "more", "other", "the"}
# Words that may sit inside a noun phrase without changing its facts.
_MODIFIERS = {"single", "lone", "solid", "identical", "matching", "filled", "plain", "bright", "similar",
              "same", "additional", "just", "only", "exactly", "colored", "coloured", "shaped"} | set(_BG_WORDS)
# Frequent function words: they end a noun phrase (never skipped as "unknown").
_STOP = {"is", "are", "at", "in", "on", "and", "with", "there", "of", "to", "by", "near", "sits", "sit",
         "it", "they", "this", "that", "these", "those", "its", "their", "be", "was", "were", "has", "have",
         "as", "well", "appear", "appears", "you", "can", "see", "we", "occupy", "occupies", "corner",
         "side", "edge", "or", "but", "each", "both", "all", "image", "picture", "shows", "contains",
         "against", "from", "for", "one", "background", "backdrop", "gradient", "seen", "also"}
_PRONOUNS = {"it", "they", "both", "all", "each", "these", "those"}
_BOUNDARIES = {".", ";", "!", "?", "\n", "while", "whereas", "meanwhile"}
_BG_KEYS = {"background", "backdrop", "backgrounds", "gradient"}
_TEXT_KEYS = {"word", "text", "written", "reads", "says", "letters", "writing", "caption"}
_VERTICAL = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_HORIZONTAL = {"left", "right"}
_CENTRE = {"center", "centre", "middle", "central"}

# A quoted single word (straight, curly or single quotes), a word, a number, or a boundary.
_TOKEN_RE = re.compile(
    r'"\s*([a-z]{1,20})\s*"|\u201c\s*([a-z]{1,20})\s*\u201d|(?<![a-z0-9])\'([a-z]{1,20})\'(?![a-z0-9])'
    r"|([a-z]+|[0-9]+)|([.;!?\n])"
)
_QUOTE = "\x00"  # prefix marking a quoted word in the token stream (cannot occur in a word token)


def _tokenise(text: str) -> list[str]:
    out = []
    for m in _TOKEN_RE.finditer(text.lower()):
        quoted = m.group(1) or m.group(2) or m.group(3)
        tok = _QUOTE + quoted if quoted else (m.group(4) or m.group(5))
        # Drop immediate repeats ("the the", "big big"): a common decoder stutter; the caption
        # grammar never repeats a word back to back.
        if not out or tok != out[-1]:
            out.append(tok)
    return out


def _clauses(tokens: list[str]) -> list[list[str]]:
    clauses, cur = [], []
    for t in tokens:
        if t in _BOUNDARIES:
            if cur:
                clauses.append(cur)
            cur = []
        else:
            cur.append(t)
    if cur:
        clauses.append(cur)
    return clauses


class _Mention:
    """One shape noun and what the caption says about it."""

    __slots__ = ("shape", "colour", "size", "count", "places", "plural")

    def __init__(self, shape: str, plural: bool):
        self.shape, self.plural = shape, plural
        self.colour = self.size = self.count = None
        self.places: list[str] = []


def _read_noun_phrase(clause: list[str], j: int, lo: int, m: _Mention, used: set[int]) -> None:
    """Fill m's count, size and colour from the words before the noun at clause[j] (down to lo)."""
    unknown_budget = 1
    i = j - 1
    while i >= lo:
        t = clause[i]
        if t in _COLOUR_WORDS:
            m.colour = m.colour or _COLOUR_WORDS[t]
        elif t in _SIZE_WORDS:
            m.size = m.size or _SIZE_WORDS[t]
        elif t in _MODIFIERS:
            pass
        elif t in _NUMBERS:
            m.count = _NUMBERS[t]
            used.add(i)
            return
        elif t == "of" and i - 1 >= lo and clause[i - 1] in _COLLECTIVE:
            m.count = _COLLECTIVE[clause[i - 1]]
            used.update((i, i - 1))
            return
        elif t in _VAGUE:
            return
        elif (t in _STOP or t in _SHAPE_NOUNS or t in _BG_KEYS or t in _VERTICAL or t in _HORIZONTAL
              or t in _CENTRE or t in _TEXT_KEYS or t.startswith(_QUOTE) or unknown_budget == 0):
            return
        else:
            unknown_budget -= 1
        used.add(i)
        i -= 1


def _find_places(clause: list[str]) -> list[tuple[int, str]]:
    """(token index, place) for every place phrase in a clause, longest match first."""
    out, i, n = [], 0, len(clause)
    while i < n:
        t, nxt = clause[i], clause[i + 1] if i + 1 < n else None
        if t in _VERTICAL:
            if nxt in _HORIZONTAL:
                out.append((i, f"{_VERTICAL[t]} {nxt}"))
                i += 2
                continue
            out.append((i, _VERTICAL[t]))  # "top", "top center", "top middle"
            i += 2 if nxt in _CENTRE else 1
            continue
        if t in _CENTRE:
            if nxt in _HORIZONTAL:  # "center left" is the left cell
                out.append((i, nxt))
                i += 2
            elif nxt in _VERTICAL:  # "middle top"
                out.append((i, _VERTICAL[nxt]))
                i += 2
            else:
                out.append((i, "center"))
                i += 1
            continue
        if t in _HORIZONTAL:
            out.append((i, t))
        i += 1
    return out


def _nearest(positions: list[int], mentions: list[tuple[int, _Mention]], i: int) -> _Mention:
    """The mention whose noun is nearest to token i; on a tie the earlier one. O(log n)."""
    k = bisect.bisect_left(positions, i)
    if k == 0:
        return mentions[0][1]
    if k == len(positions) or i - positions[k - 1] <= positions[k] - i:
        return mentions[k - 1][1]
    return mentions[k][1]


def _distance_to_sorted(sorted_positions: list[int], i: int) -> int:
    """Distance from i to the nearest of some sorted positions (non-empty). O(log n)."""
    k = bisect.bisect_left(sorted_positions, i)
    near = sorted_positions[max(0, k - 1):k + 1]
    return min(abs(p - i) for p in near)


def _preceding(positions: list[int], mentions: list[tuple[int, _Mention]], i: int) -> _Mention:
    """The last mention whose noun comes before token i, else the first one."""
    k = bisect.bisect_left(positions, i)
    return mentions[k - 1][1] if k > 0 else mentions[0][1]


def _parse(text: str) -> frozenset:
    tokens = _tokenise(text)
    mentions: list[_Mention] = []
    facts: set = set()
    last: _Mention | None = None
    for clause in _clauses(tokens):
        used: set[int] = set()
        here: list[tuple[int, _Mention]] = []
        prev_noun = -1
        for j, t in enumerate(clause):
            if t in _SHAPE_NOUNS:
                m = _Mention(_SHAPE_NOUNS[t], t in _PLURAL_NOUNS)
                _read_noun_phrase(clause, j, prev_noun + 1, m, used)
                here.append((j, m))
                prev_noun = j
        is_text = any(t in _TEXT_KEYS or t.startswith(_QUOTE) for t in clause)
        is_bg = any(t in _BG_KEYS for t in clause)
        # Who a noun-less clause talks about: the last noun, unless the clause is about the text
        # or the background (but "They are small ... on a gray background" still refers back).
        refers_back = not is_bg or clause[0] in _PRONOUNS
        fallback = last if not here and not is_text and refers_back else None
        positions = [j for j, _ in here]
        for i, place in _find_places(clause):
            target = _nearest(positions, here, i) if here else fallback
            if target is not None and place not in target.places:
                target.places.append(place)
        for i, t in enumerate(clause):
            if i in used or (t not in _SIZE_WORDS and t not in _COLOUR_WORDS):
                continue
            target = _preceding(positions, here, i) if here else fallback
            if target is None:
                continue
            if t in _SIZE_WORDS and target.size is None:
                target.size = _SIZE_WORDS[t]
            elif t in _COLOUR_WORDS and target.colour is None:
                target.colour = _COLOUR_WORDS[t]
        if is_bg:
            keys = [i for i, t in enumerate(clause) if t in _BG_KEYS]
            colours = [i for i, t in enumerate(clause) if t in _BG_WORDS]
            if colours:
                best = min(colours, key=lambda c: _distance_to_sorted(keys, c))
                facts.add(("background", _BG_WORDS[clause[best]]))
        for i, t in enumerate(clause):
            if t.startswith(_QUOTE):
                facts.add(("text", t[1:]))
            elif t == "word" and i + 1 < len(clause) and clause[i + 1] in vocab.TEXT_WORDS:
                facts.add(("text", clause[i + 1]))
        mentions.extend(m for _, m in here)
        if here:
            last = here[-1][1]
    for m in mentions:
        if m.count == 0:  # "no red circles"
            continue
        facts.add(("shape", m.shape))
        if m.colour is None:
            continue
        key = (m.shape, m.colour)
        facts.add(("colour",) + key)
        if m.count is not None and not (m.count == 1 and m.plural):
            facts.add(("count",) + key + (m.count,))
        if m.size is not None:
            facts.add(("size",) + key + (m.size,))
        facts.update(("place",) + key + (p,) for p in m.places)
    return frozenset(facts)


def parse_caption(text) -> frozenset:
    """The facts a caption claims. Never raises: non-strings are coerced, failures give no facts."""
    try:
        if text is None:
            return frozenset()
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", errors="replace")
        elif not isinstance(text, str):
            text = str(text)
        return _parse(text)
    except Exception:  # noqa: BLE001 - a scorer must survive any model output
        return frozenset()


def fact_precision_recall(claims: frozenset, truth: frozenset) -> tuple[float, float]:
    """Precision and recall of claimed facts. An empty claim has precision 1.0 (it states nothing
    false) and recall 0.0 (unless the truth is empty too, then 1.0)."""
    hit = len(claims & truth)
    precision = hit / len(claims) if claims else 1.0
    recall = hit / len(truth) if truth else 1.0
    return precision, recall


def caption_quality(caption: str, scene: Scene) -> tuple[float, float]:
    """(precision, recall) of the facts a caption claims against the scene's facts."""
    return fact_precision_recall(parse_caption(caption), scene_facts(scene))


def main_subject_correct(caption: str, scene: Scene) -> bool:
    """Whether the caption claims the main subject's shape, colour and count."""
    g = scene.main_subject
    if g is None:
        return False
    need = {("shape", g.shape), ("colour", g.shape, g.colour), ("count", g.shape, g.colour, g.count)}
    return need <= parse_caption(caption)
