"""Command line for the shapes world.

    python -m dalle3_jax.data.world check --n 2000 --json [--image-size 64] [--seed 0]
    python -m dalle3_jax.data.world show --split eval --index 3 --out x.png [--scale 4]

`check` measures the scene parser, the caption round trip, caption quality and speed on the
first n scenes of a split (see check.py); `show` writes one image and prints its captions, its
scene and what the parser reads back.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from dalle3_jax.data.world.caption_parser import caption_quality
from dalle3_jax.data.world.check import TARGETS, run_check
from dalle3_jax.data.world.scene import SPLITS, Scene, WorldConfig, scene_equal
from dalle3_jax.data.world.scene_parser import parse_image
from dalle3_jax.data.world.source import World


def _config(args) -> WorldConfig:
    return WorldConfig(seed=args.seed, image_size=args.image_size, single_object=args.single_object,
                       text_prob=args.text_prob)


def _cmd_check(args) -> int:
    result = run_check(args.n, _config(args), split=args.split, blur_sigma=args.blur, noise_sigma=args.noise)
    if args.json:
        print(json.dumps(result, sort_keys=False))
        return 0
    width = max(len(k) for k in result)
    for key, value in result.items():
        target = TARGETS.get(key)
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        note = f"   (target >= {target})" if target is not None else ""
        print(f"{key:<{width}}  {shown}{note}")
    return 0


def _cmd_show(args) -> int:
    world = World(_config(args))
    ex = world.example(args.split, args.index)
    scene = Scene.from_json(ex["scene"])
    image = ex["image"]
    if args.out:
        from PIL import Image

        big = np.repeat(np.repeat(image, args.scale, 0), args.scale, 1)
        Image.fromarray(big).save(args.out)
        print(f"wrote {args.out} ({image.shape[1]}x{image.shape[0]} px, shown x{args.scale})")
    print(f"id: {ex['id']}")
    for kind, text in ex["captions"].items():
        p, r = caption_quality(text, scene)
        print(f"{kind:>12}: {text}   [precision {p:.2f}, recall {r:.2f}]")
    print(f"       scene: {ex['scene']}")
    parsed = parse_image(image)
    print(f"      parsed: {'exact' if scene_equal(parsed, scene) else 'DIFFERS'}  {parsed.to_json()}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dalle3_jax.data.world", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("check", "show"):
        p = sub.add_parser(name)
        p.add_argument("--image-size", type=int, default=64, help="H = W of rendered images (32, 64, 128)")
        p.add_argument("--seed", type=int, default=0, help="world seed")
        p.add_argument("--single-object", action="store_true", help="one object per scene")
        p.add_argument("--text-prob", type=float, default=0.0, help="chance of a written word (>= 128 px)")
        p.add_argument("--split", default="eval", choices=SPLITS)
    check = sub.choices["check"]
    check.add_argument("--n", type=int, default=2000, help="number of scenes (the first n of the split)")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.add_argument("--blur", type=float, default=0.7, help="degradation: Gaussian blur sigma (pixels)")
    check.add_argument("--noise", type=float, default=0.03, help="degradation: Gaussian noise sigma on [0, 1]")
    show = sub.choices["show"]
    show.add_argument("--index", type=int, default=0)
    show.add_argument("--out", default=None, help="write the image here (PNG)")
    show.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscale of the written image")
    args = parser.parse_args(argv)
    return _cmd_check(args) if args.command == "check" else _cmd_show(args)


if __name__ == "__main__":
    sys.exit(main())
