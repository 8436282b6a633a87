"""Prompt following, measured exactly: generate images for held-out prompts, parse them, score facts.

Prompts are the descriptive ground-truth captions of the synthetic world's `eval` split, whose
scenes (as sets of facts) never occur in training: for one-object scenes, the attribute
combinations themselves are held out. Each generated image is read back by the world's scene
parser (`world.parse_image`) and compared with the scene the prompt describes.

Per prompted group of objects (one group in a one-object scene), after matching it to a parsed
group (`match_groups`: the one with its shape and colour if drawn, else the largest left):
  shape     object present: the matched group has the prompted shape
  colour    it has the prompted colour
  count     it has the prompted number of objects
  size      its size (small / large) is the prompted one
  place     the fraction of the prompted grid cells it occupies
Each is averaged over all prompted groups and images; `mean_fact_accuracy` is their mean;
`all_facts_correct` is the fraction of images whose every group is right on all five and that
hold no extra group. `background` (the named background colour) is reported beside them.

    python -m dalle3_jax.evals.prompt_following --workdir=DIR --json [--n_single 200 --n_multi 100]
        [--k 1 --sampler ddim --steps 25 --guidance 3 --eta 0 --seed 0 --step N --no-ema]

prints one JSON object: the single-object figures at the top level (shape, colour, count, size,
place, background, mean_fact_accuracy, all_facts_correct, n_images) and the same keys for
multi-object prompts under "multi_object", with "step" and "settings".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

import ml_collections
import numpy as np

FACTS = ("shape", "colour", "count", "size", "place")


@dataclasses.dataclass
class PromptSet:
    """Descriptive prompts of eval scenes and the scenes they describe."""

    captions: list[str]
    scenes: list[Any]  # world.Scene
    single_object: bool
    short: list[str] | None = None  # the same scenes' ground-truth short captions ("a red circle")


def load_prompts(config: ml_collections.ConfigDict, n: int, *, single_object: bool, split: str = "eval") -> PromptSet:
    """The first n scenes of the world's `split` under the run's world settings (image size,
    palette...) with `single_object` forced, and their descriptive captions."""
    from dalle3_jax.data import world

    overrides = dict(config.data.world.to_dict()) if config.data.get("world") else {}
    overrides["single_object"] = bool(single_object)
    src = world.WorldSource(split, world.WorldConfig(**overrides))
    n = min(int(n), len(src))
    examples = [src[i] for i in range(n)]
    return PromptSet([ex["captions"]["descriptive"] for ex in examples],
                     [world.Scene.from_json(ex["scene"]) for ex in examples], single_object,
                     short=[ex["captions"]["short"] for ex in examples])


def match_groups(truth, parsed) -> list:
    """For each prompted group, its parsed counterpart (or None), each parsed group used once.

    First every prompted group whose (shape, colour) was drawn takes that group; the others
    take the remaining parsed groups largest first (the parser lists the main subject first).
    Matching never looks at size or place, so a noisy image of many blobs cannot score a place
    by offering one blob in every cell.
    """
    free = list(parsed.groups)
    out = [None] * len(truth.groups)
    for i, g in enumerate(truth.groups):
        same = next((p for p in free if (p.shape, p.colour) == (g.shape, g.colour)), None)
        if same is not None:
            out[i] = same
            free.remove(same)
    for i in range(len(out)):
        if out[i] is None and free:
            out[i] = free.pop(0)
    return out


def score_scene(truth, parsed) -> dict[str, Any]:
    """Per-group fact hits of one parsed scene against the prompted one (see the module docstring)."""
    hits = {f: [] for f in FACTS}
    all_right = len(parsed.groups) == len(truth.groups)
    for g, got in zip(truth.groups, match_groups(truth, parsed)):
        if got is None:
            row = dict.fromkeys(FACTS, 0.0)
        else:
            row = {"shape": float(got.shape == g.shape), "colour": float(got.colour == g.colour),
                   "count": float(got.count == g.count), "size": float(got.size == g.size),
                   "place": len(set(g.places) & set(got.places)) / len(g.places)}
        for f in FACTS:
            hits[f].append(row[f])
        all_right = all_right and got is not None and all(v == 1.0 for v in row.values()) \
            and set(got.places) == set(g.places)
    return {"hits": hits, "all": all_right, "background": parsed.background == truth.background}


def score_images(images: np.ndarray, scenes: list[Any]) -> dict[str, float]:
    """Prompt-following figures of uint8 images [N, H, W, 3], image i generated for scenes[i]."""
    from dalle3_jax.data import world

    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes")
    if not len(images):
        raise ValueError("no images to score")
    hits = {f: [] for f in FACTS}
    all_right, background = [], []
    for image, truth in zip(images, scenes):
        s = score_scene(truth, world.parse_image(image))
        for f in FACTS:
            hits[f].extend(s["hits"][f])
        all_right.append(s["all"])
        background.append(s["background"])
    out = {f: float(np.mean(hits[f])) for f in FACTS}
    out["mean_fact_accuracy"] = float(np.mean([out[f] for f in FACTS]))
    out["all_facts_correct"] = float(np.mean(all_right))
    out["background"] = float(np.mean(background))
    out["n_images"] = len(images)
    return out


def generate_images(model, config: ml_collections.ConfigDict, tokenize, mesh, prompts: list[str], *, k: int = 1,
                    seed: int = 0, **sampler: Any) -> np.ndarray:
    """k images per prompt, uint8 [len(prompts) * k, H, W, 3] (image i is for prompts[i // k]),
    sampled with `model` (sampler settings: config.sample, overridden by `sampler`)."""
    from dalle3_jax.trainers import t2i

    captions = [c for c in prompts for _ in range(k)]
    lengths = tokenize.encode_batch(captions, 512)[1] if captions else np.zeros(0)
    # Multi-object prompts run longer than a one-object model's training length; the encoder's
    # relative positions and the token bag take any length, so no prompt is cut short.
    length = max(int(config.input.max_text_len), int(np.max(lengths, initial=0)))
    return t2i.sample_captions(model, config, tokenize, captions, mesh, seed=seed, max_text_len=length, **sampler)


def score_model(model, config: ml_collections.ConfigDict, tokenize, mesh, prompts: PromptSet, *, k: int = 1,
                seed: int = 0, **sampler: Any) -> dict[str, float]:
    """Generates k images per prompt with `model` (sampler settings: config.sample, overridden
    by `sampler`) and scores them."""
    images = generate_images(model, config, tokenize, mesh, prompts.captions, k=k, seed=seed, **sampler)
    return score_images(images, [s for s in prompts.scenes for _ in range(k)])


def evaluate_workdir(workdir: str, *, n_single: int = 200, n_multi: int = 100, k: int = 1, seed: int = 0,
                     step: int | None = None, ema: bool = True, **sampler: Any) -> dict[str, Any]:
    """Restores the run in `workdir` and scores single- and multi-object prompt sets."""
    import jax

    from dalle3_jax.trainers import t2i

    config, model, tokenize, mesh, step = t2i.load_run(workdir, step=step, ema=ema)
    settings = {**config.sample.to_dict(), **sampler}
    out: dict[str, Any] = {"workdir": workdir, "step": step}
    with jax.set_mesh(mesh):
        if n_single:
            out.update(score_model(model, config, tokenize, mesh, load_prompts(config, n_single, single_object=True),
                                   k=k, seed=seed, **settings))
        if n_multi:
            multi = load_prompts(config, n_multi, single_object=False)
            out["multi_object"] = score_model(model, config, tokenize, mesh, multi, k=k, seed=seed, **settings)
    out["settings"] = dict(settings, k=k, seed=seed, ema=ema, n_single=n_single, n_multi=n_multi)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a T2I run directory")
    parser.add_argument("--n_single", type=int, default=200, help="single-object eval prompts (0 = skip)")
    parser.add_argument("--n_multi", type=int, default=100, help="multi-object eval prompts (0 = skip)")
    parser.add_argument("--k", type=int, default=1, help="images per prompt")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    from dalle3_jax.trainers import t2i

    t2i.add_sampler_flags(parser)
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error("--k must be >= 1")
    from dalle3_jax import runtime

    runtime.init()
    out = evaluate_workdir(args.workdir, n_single=args.n_single, n_multi=args.n_multi, k=args.k, seed=args.seed,
                           step=args.step, ema=not args.no_ema, **t2i.sampler_overrides(args))
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:20s} {json.dumps(value) if isinstance(value, dict) else value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
