"""Self-check of the shapes world: parser exactness, caption round trip, caption quality, speed.

`run_check` is what `python -m dalle3_jax.data.world check` prints; tests call it on small n.
"""

from __future__ import annotations

import time

import numpy as np

from dalle3_jax.data.world.caption_parser import fact_precision_recall, main_subject_correct, parse_caption
from dalle3_jax.data.world.captioning import captions
from dalle3_jax.data.world.rendering import degrade, render
from dalle3_jax.data.world.scene import WorldConfig, sample_scene, scene_facts, scene_rngs
from dalle3_jax.data.world.scene_parser import parse_image

# Targets from the design: the check reports them next to the measured values.
TARGETS = {"parser_exact_clean": 0.99, "parser_exact_degraded": 0.95, "caption_roundtrip": 1.0}


def run_check(n: int = 2000, config: WorldConfig | None = None, split: str = "eval",
              blur_sigma: float = 0.7, noise_sigma: float = 0.03) -> dict:
    """Measure the world on the first n scenes of a split. Returns a flat dict of numbers."""
    cfg = config or WorldConfig()
    t_start = time.perf_counter()
    t_scene = t_render = t_caption = t_parse = 0.0
    exact_clean = exact_degraded = roundtrip = 0
    fact_pr = {"clean": [], "degraded": []}
    quality = {k: [] for k in ("descriptive", "short", "alt")}
    main_ok = {k: 0 for k in ("short", "alt")}
    words = []
    for i in range(n):
        scene_rng, caption_rng, alt_rng = scene_rngs(cfg.seed, split, i)
        t0 = time.perf_counter()
        scene = sample_scene(scene_rng, cfg, split)
        t1 = time.perf_counter()
        image = render(scene, cfg.image_size)
        t2 = time.perf_counter()
        caps = captions(scene, caption_rng, cfg, alt_rng)
        t3 = time.perf_counter()
        t_scene, t_render, t_caption = t_scene + t1 - t0, t_render + t2 - t1, t_caption + t3 - t2
        truth = scene_facts(scene)

        # The noise stream is its own, so the degraded test set is fixed for a (seed, index).
        noisy = degrade(image, blur_sigma, noise_sigma, np.random.default_rng([cfg.seed, i, 7]))
        for name, img in (("clean", image), ("degraded", noisy)):
            t0 = time.perf_counter()
            got = scene_facts(parse_image(img))
            t_parse += time.perf_counter() - t0
            fact_pr[name].append(fact_precision_recall(got, truth))
            if got == truth:
                if name == "clean":
                    exact_clean += 1
                else:
                    exact_degraded += 1

        roundtrip += parse_caption(caps["descriptive"]) == truth
        words.append(len(caps["descriptive"].split()))
        for kind, text in caps.items():
            quality[kind].append(fact_precision_recall(parse_caption(text), truth))
        main_ok["short"] += main_subject_correct(caps["short"], scene)
        main_ok["alt"] += main_subject_correct(caps["alt"], scene)

    out = {
        "n": n,
        "split": split,
        "image_size": cfg.image_size,
        "seed": cfg.seed,
        "parser_exact_clean": exact_clean / n,
        "parser_exact_degraded": exact_degraded / n,
        "parser_fact_precision_degraded": float(np.mean([p for p, _ in fact_pr["degraded"]])),
        "parser_fact_recall_degraded": float(np.mean([r for _, r in fact_pr["degraded"]])),
        "caption_roundtrip": roundtrip / n,
    }
    for kind in ("descriptive", "short", "alt"):
        out[f"{kind}_fact_precision"] = float(np.mean([p for p, _ in quality[kind]]))
        out[f"{kind}_fact_recall"] = float(np.mean([r for _, r in quality[kind]]))
    out["short_main_subject_correct"] = main_ok["short"] / n
    out["alt_main_subject_correct"] = main_ok["alt"] / n
    out["descriptive_words_mean"] = float(np.mean(words))
    out["descriptive_words_min"] = int(np.min(words))
    out["descriptive_words_max"] = int(np.max(words))
    out["images_per_s"] = n / max(t_render, 1e-9)
    out["scenes_per_s"] = n / max(t_scene, 1e-9)
    out["examples_per_s"] = n / max(t_scene + t_render + t_caption, 1e-9)
    out["parse_ms"] = 1e3 * t_parse / (2 * n)
    out["seconds"] = time.perf_counter() - t_start
    return out
