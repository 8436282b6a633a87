"""Random-access data sources over the shapes world.

`World` turns (split, index) into scenes and examples; `WorldSource` is one split as a sequence
(`__len__`, `__getitem__`), the protocol Grain's data loaders read. Both hold only a frozen config,
so they pickle cheaply into loader worker processes, and every worker renders the same example i.
"""

from __future__ import annotations

import operator

import numpy as np

from dalle3_jax.data.world.captioning import captions
from dalle3_jax.data.world.rendering import render
from dalle3_jax.data.world.scene import SPLITS, Scene, WorldConfig, sample_scene, scene_rngs


class World:
    """The shapes world for one config: scenes, images and captions by (split, index)."""

    def __init__(self, config: WorldConfig | None = None):
        self.config = config or WorldConfig()

    def __repr__(self) -> str:
        return f"World({self.config!r})"

    def _check(self, split: str, index) -> int:
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; expected one of {SPLITS}")
        i = operator.index(index)
        if not 0 <= i < self.config.split_size(split):
            raise IndexError(f"index {i} out of range for split {split!r} of length {self.config.split_size(split)}")
        return i

    def scene(self, split: str, index: int) -> Scene:
        """The scene at (split, index); deterministic in (config.seed, split, index)."""
        i = self._check(split, index)
        return sample_scene(scene_rngs(self.config.seed, split, i)[0], self.config, split)

    def image(self, split: str, index: int) -> np.ndarray:
        """The rendered image, uint8 [H, W, 3]."""
        return render(self.scene(split, index), self.config.image_size)

    def text_example(self, split: str, index: int) -> dict:
        """`example` without the image: {"id", "captions", "scene"}, the same captions (rendering
        costs most of an example; text-only consumers such as the prompt upsampler skip it)."""
        i = self._check(split, index)
        scene_rng, caption_rng, alt_rng = scene_rngs(self.config.seed, split, i)
        scene = sample_scene(scene_rng, self.config, split)
        return {"id": f"{split}/{i:09d}", "captions": captions(scene, caption_rng, self.config, alt_rng),
                "scene": scene.to_json()}

    def example(self, split: str, index: int) -> dict:
        """{"id", "image" uint8 [H, W, 3], "captions" {descriptive, short, alt}, "scene" JSON}."""
        i = self._check(split, index)
        scene_rng, caption_rng, alt_rng = scene_rngs(self.config.seed, split, i)
        scene = sample_scene(scene_rng, self.config, split)
        return {
            "id": f"{split}/{i:09d}",
            "image": render(scene, self.config.image_size),
            "captions": captions(scene, caption_rng, self.config, alt_rng),
            "scene": scene.to_json(),
        }


class WorldSource:
    """One split of the shapes world as a random-access sequence of example dicts."""

    def __init__(self, split: str, config: WorldConfig | None = None):
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.split = split
        self.config = config or WorldConfig()
        self._world = World(self.config)

    def __len__(self) -> int:
        return self.config.split_size(self.split)

    def __getitem__(self, index) -> dict:
        i = operator.index(index)
        if i < 0:  # Python sequence semantics for negative indices
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of range for {self.split!r} of length {len(self)}")
        return self._world.example(self.split, i)

    def __repr__(self) -> str:
        return f"WorldSource(split={self.split!r}, config={self.config!r})"
