"""Caption blending for T2I training: per example, a synthetic caption with probability p.

The DALL-E 3 recipe trains on a blend: with probability `blend` an example's caption is the
synthetic one (SSC or DSC, from the recaption job), otherwise its original alt text, so the model
keeps working on the short, noisy prompts people actually type. `CaptionBlend` is a
`caption_field` callable for the Grain pipeline (`pipeline.make_loader(caption_field=...)`).

The choice is a pure function of (seed, example id): a stable hash (BLAKE2b, never Python's
salted hash()) of both, read as a uniform number in [0, 1). So every process, every worker and
every resumed run picks the same caption for the same example, and no random state needs to be
checkpointed. The record's id is the key (its source index when it has none), so the same image
keeps its choice whichever shard or order it is read in.

A given example keeps its choice in every epoch; the shapes world's training split (1M scenes)
is far larger than any CPU run reads, so repeats do not arise there.

    blend = CaptionBlend(field="dsc", blend=0.95, fallback="alt", seed=0)
    blend(record, index)   # record["captions"]["dsc"] for ~95% of ids, else ["alt"]
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

# Caption choices of the T2I configs: the synthetic captions of the recaption job (ssc / dsc),
# the alt text alone, and the oracle: the world's true descriptive caption.
CHOICES = {"alt": "alt", "ssc": "ssc", "dsc": "dsc", "descriptive_gt": "descriptive"}


def uniform(seed: int, key: str) -> float:
    """A number in [0, 1) determined by (seed, key) alone."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


@dataclasses.dataclass(frozen=True)
class CaptionBlend:
    """Picks record["captions"][field] with probability `blend`, else [fallback].

    Frozen and made of plain values, so it pickles into Grain worker processes.
    """

    field: str
    blend: float = 1.0
    fallback: str = "alt"
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.blend <= 1.0:
            raise ValueError(f"blend must be a probability in [0, 1], got {self.blend}")

    def uses_field(self, record_key: str) -> bool:
        """Whether the example keyed `record_key` gets the synthetic caption."""
        return self.blend >= 1.0 or (self.blend > 0.0 and uniform(self.seed, record_key) < self.blend)

    def name(self, record: Mapping[str, Any], index: int) -> str:
        """The caption name this example gets: `field` or `fallback` (cached text states are
        stored per name, diffusion/text_cache.py)."""
        return self.field if self.uses_field(str(record.get("id", f"#{index}"))) else self.fallback

    def fields(self) -> tuple[str, ...]:
        """Every caption name this blend can pick."""
        picks = ((self.field,) if self.blend > 0.0 else ()) + ((self.fallback,) if self.blend < 1.0 else ())
        return tuple(dict.fromkeys(picks))

    def __call__(self, record: Mapping[str, Any], index: int) -> str:
        key = str(record.get("id", f"#{index}"))
        name = self.name(record, index)
        captions = record.get("captions") or {}
        if name not in captions:
            raise KeyError(f"record {key} has no caption {name!r} (it has {sorted(captions)}); "
                           f"caption blending needs {self.field!r}" +
                           (f" and {self.fallback!r}" if self.blend < 1.0 else ""))
        return captions[name]


def from_choice(caption: str, blend: float, seed: int) -> str | CaptionBlend:
    """A pipeline caption_field for a T2I config's `caption` choice (see CHOICES).

    "alt" is the plain alt-text field (no blending); the others blend their field with alt.
    """
    if caption not in CHOICES:
        raise ValueError(f"unknown caption choice {caption!r}; valid: {', '.join(CHOICES)}")
    if caption == "alt":
        return "alt"
    return CaptionBlend(field=CHOICES[caption], blend=float(blend), fallback="alt", seed=int(seed))
