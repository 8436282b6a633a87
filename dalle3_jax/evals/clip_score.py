"""CLIP score and retrieval with the evaluation CLIP (configs/eval_clip.py).

CLIP score, as DESIGN.md defines it: 100 * max(cos(image embedding, text embedding), 0), per
(image, text) pair, from a CLIP that no model under evaluation has seen (on the synthetic world
it is trained only on the `judge` split). Both embeddings are unit vectors, so the cosine is
their dot product.

    from dalle3_jax.evals.clip_score import ClipScorer
    scorer = ClipScorer.from_workdir("workdirs/eval_clip")        # latest checkpoint
    scorer = ClipScorer.from_pretrained("/data/clip-vit-base-patch32")  # an HF CLIP directory
    scores = scorer.score(images, texts)       # np.ndarray [N]; images uint8 [N, H, W, 3] or float in [0, 1]
    scorer.retrieval(images, texts)            # recall@1 both ways (see `retrieval_recall`)

Images of another size than the CLIP's are resized to it (centre crop + bicubic, as the training
loader does). Encoding is batched with fixed shapes (the last batch is padded by repeating its
last row), jitted once per shape, and split over all devices.

    python -m dalle3_jax.evals.clip_score --clip_workdir=workdirs/eval_clip [--split eval --n 512] --json
    python -m dalle3_jax.evals.clip_score --clip_pretrained=/data/clip-vit-base-patch32 --json

prints the CLIP's figures on the world's eval split (short and descriptive captions): retrieval
recall@1, the mean CLIP score of matching and of mismatched pairs, and how often it scores a
scene's true image above the image with one fact changed (`swap_figures`: the judge's use).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from dalle3_jax import sharding
from dalle3_jax.data import pipeline
from dalle3_jax.data import tokenizer as tokenizer_lib


def clip_score(image_embed: np.ndarray, text_embed: np.ndarray) -> np.ndarray:
    """100 * max(cos(image_embed[i], text_embed[i]), 0) per row: [N, E] x [N, E] -> [N].

    The embeddings need not be normalised; the cosine normalises them (a zero vector scores 0).
    """
    a = np.asarray(image_embed, np.float64)
    b = np.asarray(text_embed, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two [N, E] arrays of one shape, got {a.shape} and {b.shape}")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.divide(np.sum(a * b, axis=1), norms, out=np.zeros(len(a)), where=norms > 0)
    return (100.0 * np.clip(cos, 0.0, None)).astype(np.float32)


def retrieval_recall(image_embed: np.ndarray, text_embed: np.ndarray,
                     texts: Sequence[str] | None = None) -> dict[str, float]:
    """Recall@1 among N pairs (pair i is the match), both ways.

    i2t_r1: the nearest text of image i is text i; t2i_r1: the nearest image of text i is image i.
    With `texts`, also i2t_r1_text / t2i_r1_text, which count a hit whenever the retrieved item's
    text equals the reference text: many eval scenes share one short caption ("a red circle"), so
    strict recall of short captions is capped near 1 / (scenes per caption) however good the CLIP.
    """
    sim = np.asarray(image_embed, np.float32) @ np.asarray(text_embed, np.float32).T
    target = np.arange(len(sim))
    i2t, t2i = np.argmax(sim, axis=1), np.argmax(sim, axis=0)
    out = {"i2t_r1": float(np.mean(i2t == target)), "t2i_r1": float(np.mean(t2i == target))}
    if texts is not None:
        t = np.asarray(list(texts), dtype=object)
        out["i2t_r1_text"] = float(np.mean(t[i2t] == t))
        out["t2i_r1_text"] = float(np.mean(t[t2i] == t))
    return out


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    return x if len(x) == size else np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


def to_model_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, H, W, 3] (0..255) or float [N, H, W, 3] in [0, 1] -> float32 [N, size, size, 3]
    in [-1, 1], prepared as the training loader prepares its images (`pipeline.model_image`)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images [N, H, W, 3], got shape {images.shape}")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
        # Float images in [0, 1] (what a sampler returns before quantising) become the uint8
        # image the CLIP was trained on.
        images = np.clip(np.round(images.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return np.stack([pipeline.model_image(im, size) for im in images]) if len(images) else \
        np.zeros((0, size, size, 3), np.float32)


class ClipScorer:
    """Image and text embeddings, CLIP scores and retrieval from a CoCa/CLIP model.

    `model` is any CoCa (dalle3_jax/models/coca.py) or CLIP (models/clip.py, e.g. imported by
    `from_pretrained`): its contrastive towers are used. A model with `from_unit_range` (CLIP)
    maps the project's [-1, 1] images into its own input space (its mean/std normalisation).
    The jitted encoders read the model's current weights at every call, so a scorer built
    around a model that is still training scores the latest weights.
    """

    def __init__(self, model: nnx.Module, tokenize: tokenizer_lib.Tokenize, mesh, *, batch_size: int = 128,
                 step: int | None = None, workdir: str | None = None):
        self.model, self.tokenize, self.mesh = model, tokenize, mesh
        dp = sharding.data_parallel_size(mesh)
        self.batch_size = max(dp, (int(batch_size) // dp) * dp)  # whole examples on every device
        self.step, self.workdir = step, workdir
        self.image_size = int(model.config.image_size)
        self.max_text_len = int(model.config.max_text_len)
        graphdef = nnx.graphdef(model)

        @jax.jit
        def encode_images(state, images):
            m = nnx.merge(graphdef, state)
            return m.encode_image(m.from_unit_range(images) if hasattr(m, "from_unit_range") else images)[0]

        @jax.jit
        def encode_texts(state, tokens):
            return nnx.merge(graphdef, state).encode_text(tokens)

        self._encode_images, self._encode_texts = encode_images, encode_texts

    @classmethod
    def from_workdir(cls, clip_workdir: str, step: int | None = None, *, batch_size: int = 128,
                     mesh=None) -> ClipScorer:
        """The CLIP trained in `clip_workdir` (its config.json and checkpoint `step`, latest by
        default), on all devices data parallel unless `mesh` is given."""
        from dalle3_jax import checkpoint
        from dalle3_jax.models import coca

        from dalle3_jax.trainers import loop

        config = loop.load_run_config(clip_workdir)
        if config.get("model", {}).get("model") != "coca":
            raise ValueError(f"{clip_workdir!r} holds a {config.get('trainer')!r} run without a CoCa/CLIP model")
        mesh = mesh or sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
        tokenize = tokenizer_lib.Tokenize(tokenizer_lib.load_tokenizer(config.get("tokenizer") or None))
        # An abstract model is the restore target: the weights come from the checkpoint.
        graphdef, abstract = sharding.abstract_state(lambda: coca.create(config.model, rngs=nnx.Rngs(0)), mesh)
        model = nnx.merge(graphdef, abstract)
        with jax.set_mesh(mesh):
            step = checkpoint.load_model_weights(os.path.join(clip_workdir, "checkpoints"), model, step=step)
        return cls(model, tokenize, mesh, batch_size=batch_size, step=step, workdir=clip_workdir)

    @classmethod
    def from_pretrained(cls, path: str, *, batch_size: int = 128, mesh=None) -> ClipScorer:
        """A Hugging Face CLIP checkpoint directory (config.json + safetensors weights +
        tokenizer.json, optionally preprocessor_config.json) as the evaluation CLIP: weights
        through `weights.clip.load_clip`, texts through the checkpoint's own tokenizer, images
        centre-cropped, resized to its size and normalised with its mean and std."""
        from dalle3_jax.weights import clip as clip_weights

        mesh = mesh or sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
        tokenize = clip_weights.ClipTokenizer.from_pretrained(path)  # first: a missing tokenizer fails fast
        model, _ = clip_weights.load_clip(path, mesh=mesh)
        if model.config.towers != "both":
            raise ValueError(f"{path!r} holds a one-tower CLIP ({model.config.towers}); scoring needs both towers")
        return cls(model, tokenize, mesh, batch_size=batch_size, workdir=path)

    # -- embeddings -------------------------------------------------------------------------------

    def _run(self, fn, rows: np.ndarray) -> np.ndarray:
        bs, out = self.batch_size, []
        state = nnx.state(self.model)
        with jax.set_mesh(self.mesh):
            for start in range(0, len(rows), bs):
                chunk = rows[start:start + bs]
                x = sharding.global_batch({"x": _pad_rows(chunk, bs)}, self.mesh)["x"]
                out.append(np.asarray(jax.device_get(fn(state, x)), np.float32)[:len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, int(self.model.config.embed_dim)), np.float32)

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """Unit image embeddings [N, E] of uint8 / [0, 1]-float images [N, H, W, 3] (any H = W)."""
        return self._run(self._encode_images, to_model_images(images, self.image_size))

    def encode_model_images(self, images: np.ndarray) -> np.ndarray:
        """Unit image embeddings of images already prepared for the model (float [-1, 1], CLIP size)."""
        return self._run(self._encode_images, np.asarray(images, np.float32))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Unit text embeddings [N, E]. Texts are tokenised to the CLIP's whole position table
        (one shape for every call); longer texts are cut, keeping their end-of-text token."""
        tokens, _ = self.tokenize.encode_batch(list(texts), self.max_text_len)
        return self._run(self._encode_texts, tokens)

    # -- scores -----------------------------------------------------------------------------------

    def score(self, images: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """CLIP score of each (images[i], texts[i]) pair: float32 [N] in [0, 100]."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images for {len(texts)} texts")
        return clip_score(self.encode_images(images), self.encode_texts(texts))

    def retrieval(self, images: np.ndarray, texts: Sequence[str]) -> dict[str, float]:
        """Recall@1 among these N pairs, both ways, strict and by text (see `retrieval_recall`)."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images for {len(texts)} texts")
        return retrieval_recall(self.encode_images(images), self.encode_texts(texts), texts)


def judge_figures(scorer: ClipScorer, model_images: np.ndarray, captions: Mapping[str, Sequence[str]],
                  *, image_embed: np.ndarray | None = None) -> dict[str, float]:
    """How far the CLIP can be trusted as a judge, per caption field (e.g. short, descriptive):

      {field}/i2t_r1, {field}/t2i_r1            strict recall@1 among the N pairs
      {field}/i2t_r1_text, {field}/t2i_r1_text  recall@1 counting identical texts as hits
      {field}/clip_score                        mean CLIP score of the matching pairs
      {field}/clip_score_mismatched             ... of each image with the next image's text

    `model_images` are prepared model inputs (float [-1, 1] at the CLIP's size).
    """
    if image_embed is None:
        image_embed = scorer.encode_model_images(model_images)
    out: dict[str, float] = {}
    for field, texts in captions.items():
        text_embed = scorer.encode_texts(texts)
        for key, value in retrieval_recall(image_embed, text_embed, texts).items():
            out[f"{field}/{key}"] = value
        out[f"{field}/clip_score"] = float(np.mean(clip_score(image_embed, text_embed)))
        out[f"{field}/clip_score_mismatched"] = float(np.mean(clip_score(image_embed, np.roll(text_embed, 1, 0))))
    return out


SWAP_KINDS = ("colour", "shape", "size", "place", "background")
SHORT_KINDS = ("colour", "shape")  # the facts a short caption states (and count, always 1 in one-object scenes)


def swapped_scene(scene: Any, kind: str, rng: np.random.Generator) -> Any | None:
    """`scene` with one fact of its main subject (or its background) changed to another valid
    value, or None where no other value fits (e.g. no free cell to move to)."""
    import dataclasses

    from dalle3_jax.data.world import vocab

    if not scene.groups:
        return None
    g, rest = scene.groups[0], scene.groups[1:]
    pairs = {(h.colour, h.shape) for h in rest}
    if kind == "background":
        options = [b for b in vocab.BACKGROUNDS if b != scene.background]
        return dataclasses.replace(scene, background=options[int(rng.integers(len(options)))])
    if kind == "colour":
        options = [c for c in vocab.COLOURS if c != g.colour and (c, g.shape) not in pairs and c != scene.background]
        new = dataclasses.replace(g, colour=options[int(rng.integers(len(options)))]) if options else None
    elif kind == "shape":
        options = [x for x in vocab.SHAPES if x != g.shape and (g.colour, x) not in pairs]
        new = dataclasses.replace(g, shape=options[int(rng.integers(len(options)))]) if options else None
    elif kind == "size":
        new = dataclasses.replace(g, size=next(x for x in vocab.SIZES if x != g.size))
    elif kind == "place":
        taken = {p for h in scene.groups for p in h.places} | ({scene.text_place} if scene.text_place else set())
        free = [p for p in vocab.PLACES if p not in taken]
        if len(free) < g.count:
            return None
        picks = sorted(rng.choice(len(free), size=g.count, replace=False))
        new = dataclasses.replace(g, places=tuple(free[i] for i in picks))
    else:
        raise ValueError(f"unknown fact kind {kind!r}; valid: {SWAP_KINDS}")
    if new is None:
        return None
    return dataclasses.replace(scene, groups=(new,) + tuple(rest))


def swap_figures(scorer: ClipScorer, scenes: Sequence[Any], captions: Mapping[str, Sequence[str]], *,
                 render_size: int, image_embed: np.ndarray | None = None, seed: int = 0) -> dict[str, float]:
    """The judge's use, one fact at a time: for each scene and fact kind, the image of the
    scene with that fact changed (`swapped_scene`) is rendered, and the CLIP must score the true
    image above it against the scene's caption. Returns {field}/swap_{kind} (the fraction of
    scenes it does) and {field}/swap_mean, for the descriptive captions over SWAP_KINDS and the
    short captions over the kinds they state (SHORT_KINDS).
    """
    from dalle3_jax.data import world

    rng = np.random.default_rng(seed)
    if image_embed is None:
        image_embed = scorer.encode_images(np.stack([world.render(s, render_size) for s in scenes]))
    text_embed = {f: scorer.encode_texts(t) for f, t in captions.items()}
    out: dict[str, float] = {}
    for kind in SWAP_KINDS:
        pairs = [(i, swapped_scene(s, kind, rng)) for i, s in enumerate(scenes)]
        pairs = [(i, s) for i, s in pairs if s is not None]
        if not pairs:
            continue
        rows = np.array([i for i, _ in pairs])
        swapped = scorer.encode_images(np.stack([world.render(s, render_size) for _, s in pairs]))
        for field, te in text_embed.items():
            if field == "short" and kind not in SHORT_KINDS:
                continue  # a short caption does not state it: either image is right
            true = np.sum(image_embed[rows] * te[rows], axis=1)
            wrong = np.sum(swapped * te[rows], axis=1)
            out[f"{field}/swap_{kind}"] = float(np.mean(true > wrong))
    for field in captions:
        values = [v for k, v in out.items() if k.startswith(f"{field}/swap_")]
        if values:
            out[f"{field}/swap_mean"] = float(np.mean(values))
    return out


def load_judge_set(world_overrides: Mapping[str, Any], image_size: int, n: int, *, split: str = "eval",
                   fields: Sequence[str] = ("short", "descriptive")) -> tuple[np.ndarray, dict[str, list[str]], list]:
    """The first n scenes of the world's `split`: model images [n, S, S, 3], their captions
    {field: [n texts]} and their scenes."""
    from dalle3_jax.data import world

    src = world.WorldSource(split, world.WorldConfig(**dict(world_overrides)))
    records = [src[i] for i in range(min(int(n), len(src)))]
    images = np.stack([pipeline.model_image(r["image"], image_size) for r in records])
    return (images, {f: [r["captions"][f] for r in records] for f in fields},
            [world.Scene.from_json(r["scene"]) for r in records])


def all_figures(scorer: ClipScorer, world_overrides: Mapping[str, Any], images: np.ndarray,
                captions: Mapping[str, Sequence[str]], scenes: Sequence[Any]) -> dict[str, float]:
    """judge_figures and swap_figures of one judge set (see load_judge_set)."""
    from dalle3_jax.data import world

    image_embed = scorer.encode_model_images(images)
    out = judge_figures(scorer, images, captions, image_embed=image_embed)
    render_size = world.WorldConfig(**dict(world_overrides)).image_size
    out.update(swap_figures(scorer, scenes, captions, render_size=render_size, image_embed=image_embed))
    return out


def evaluate_workdir(clip_workdir: str, *, n: int | None = None, split: str | None = None,
                     step: int | None = None) -> dict[str, Any]:
    """The judge figures of a trained evaluation CLIP on its eval split (see `judge_figures`)."""
    scorer = ClipScorer.from_workdir(clip_workdir, step=step)
    with open(os.path.join(clip_workdir, "config.json")) as f:
        config = json.load(f)
    ev = config.get("eval", {})
    world_overrides = config["data"].get("world", {})
    images, captions, scenes = load_judge_set(world_overrides, scorer.image_size, n or ev.get("n_examples", 512),
                                              split=split or ev.get("split", "eval"))
    return {"workdir": clip_workdir, "step": scorer.step, "n_examples": len(images),
            **all_figures(scorer, world_overrides, images, captions, scenes)}


def evaluate_pretrained(path: str, *, n: int | None = None, split: str | None = None,
                        world_overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The judge figures of an imported Hugging Face CLIP (`ClipScorer.from_pretrained`) on the
    world's `split` (eval by default; the default world unless `world_overrides`)."""
    scorer = ClipScorer.from_pretrained(path)
    world_overrides = dict(world_overrides or {})
    images, captions, scenes = load_judge_set(world_overrides, scorer.image_size, n or 512, split=split or "eval")
    return {"clip_pretrained": path, "n_examples": len(images),
            **all_figures(scorer, world_overrides, images, captions, scenes)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--clip_workdir", help="an evaluation CLIP run directory")
    which.add_argument("--clip_pretrained", help="a Hugging Face CLIP checkpoint directory (config.json, "
                                                 "safetensors weights, tokenizer.json)")
    parser.add_argument("--n", type=int, default=None, help="eval scenes (default: the config's)")
    parser.add_argument("--split", default=None, help="world split (default: the config's, eval)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    from dalle3_jax import runtime

    runtime.init()
    if args.clip_pretrained:
        out = evaluate_pretrained(args.clip_pretrained, n=args.n, split=args.split)
    else:
        out = evaluate_workdir(args.clip_workdir, n=args.n, split=args.split, step=args.step)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:36s} {v:.4f}" if isinstance(v, float) else f"{k:36s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
