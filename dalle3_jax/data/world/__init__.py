"""The built-in synthetic "shapes world": scenes, renders, captions, and parsers for both.

Scenes are drawn deterministically from (seed, split, index); images are anti-aliased renders
[H, W, 3] uint8; each example carries a descriptive and a short ground-truth caption and a noisy
web-like alt text. The scene parser (image -> scene) and the caption parser (text -> facts) let
every stage of the recipe be scored exactly against the truth. The shared fact definitions are in
`dalle3_jax.data.world.scene` (module docstring).

    from dalle3_jax.data.world import WorldConfig, WorldSource, parse_image, parse_caption
    src = WorldSource("eval", WorldConfig(image_size=64))
    ex = src[3]                                   # {"id", "image", "captions", "scene"}
    scene = Scene.from_json(ex["scene"])
    scene_equal(parse_image(ex["image"]), scene)  # True for clean renders
    caption_quality(ex["captions"]["alt"], scene) # (precision, recall)

CLI: `python -m dalle3_jax.data.world check --n 2000 --json` and `... show --split eval --index 3`.
"""

from dalle3_jax.data.world.caption_parser import (
    caption_quality,
    fact_precision_recall,
    main_subject_correct,
    parse_caption,
)
from dalle3_jax.data.world.captioning import alt_caption, captions, descriptive_caption, short_caption
from dalle3_jax.data.world.rendering import render
from dalle3_jax.data.world.scene import (
    SPLIT_BUCKETS,
    SPLIT_ID,
    SPLITS,
    Group,
    Scene,
    WorldConfig,
    fact_bucket,
    sample_scene,
    scene_equal,
    scene_facts,
    scene_rngs,
)
from dalle3_jax.data.world.scene_parser import parse_image, to_float_image
from dalle3_jax.data.world.source import World, WorldSource
from dalle3_jax.data.world.vocab import (
    BACKGROUNDS,
    COLOURS,
    PLACES,
    SHAPES,
    SIZES,
    TEXT_WORDS,
)

__all__ = [
    "BACKGROUNDS", "COLOURS", "PLACES", "SHAPES", "SIZES", "TEXT_WORDS",
    "SPLITS", "SPLIT_ID", "SPLIT_BUCKETS",
    "Group", "Scene", "WorldConfig", "World", "WorldSource",
    "sample_scene", "scene_rngs", "scene_facts", "scene_equal", "fact_bucket",
    "render", "captions", "descriptive_caption", "short_caption", "alt_caption",
    "parse_caption", "caption_quality", "fact_precision_recall", "main_subject_correct",
    "parse_image", "to_float_image",
]
