"""Captioner evaluation: validation loss, image<->text retrieval and caption quality.

Caption quality uses the synthetic world's caption parser: each greedy caption of an eval image
is parsed into facts and scored against the image's true scene (fact precision: how much of
what it says is true; fact recall: how much of the scene it states), and the main subject
(shape, colour and count of the dominant group) is checked. On data without scenes only the
loss and retrieval figures are reported.

Used by the captioner trainer during training, and on its own for a finished run:

    python -m dalle3_jax.evals.captions --workdir=DIR [--n 512] [--json]

prints `fact_precision`, `fact_recall`, `main_subject_accuracy`, `val_loss`, `retrieval_i2t_r1`,
`retrieval_t2i_r1` and the recall per fact kind (`fact_recall/shape`, ...) for the latest
checkpoint in DIR.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dalle3_jax import sharding
from dalle3_jax.data import pipeline
from dalle3_jax.data import tokenizer as tokenizer_lib
from dalle3_jax.models import coca
from dalle3_jax.recaption import decode


@dataclasses.dataclass
class EvalSet:
    """The first n records of an eval source, prepared once (B = n)."""

    image: np.ndarray  # float32 [B, S, S, 3] in [-1, 1]
    tokens: np.ndarray  # int32 [B, L] of the reference captions
    captions: list[str]  # reference captions
    scenes: list[Any] | None  # true scenes (synthetic world), else None
    ids: list[str]


def load_eval_set(source: Any, n: int, *, image_size: int, tokenize: tokenizer_lib.Tokenize, caption_field: str,
                  max_text_len: int) -> EvalSet:
    """Reads and prepares records 0..n-1 of `source` exactly as the training loader would."""
    n = min(n, len(source))
    if n == 0:
        raise ValueError("the eval source is empty")
    images, captions, scenes, ids = [], [], [], []
    for i in range(n):
        rec = source[i]
        images.append(pipeline.model_image(rec["image"], image_size))
        if caption_field not in rec.get("captions", {}):
            raise KeyError(f"eval record {rec.get('id', i)} has no caption {caption_field!r}; "
                           f"it has {sorted(rec.get('captions', {}))}")
        captions.append(rec["captions"][caption_field])
        scenes.append(rec.get("scene"))
        ids.append(str(rec.get("id", i)))
    tokens, _ = tokenize.encode_batch(captions, max_text_len)
    parsed_scenes = None
    if all(s is not None for s in scenes):
        from dalle3_jax.data.world import Scene

        parsed_scenes = [Scene.from_json(s) for s in scenes]
    return EvalSet(np.stack(images), tokens, captions, parsed_scenes, ids)


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


def _pad_to(x: np.ndarray, size: int) -> np.ndarray:
    """Pads the batch dim to `size` by repeating the last row (static shapes, one compile)."""
    if len(x) == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


class CaptionEvaluator:
    """Evaluates a CoCa model on a fixed eval set; jitted programs are built once and reused."""

    def __init__(self, eval_set: EvalSet, tokenize: tokenizer_lib.Tokenize, mesh, *, batch_size: int,
                 loss_weights: Mapping[str, Any], decode_settings: Mapping[str, Any], n_logged: int = 4):
        self.data = eval_set
        self.tokenize = tokenize
        self.mesh = mesh
        dp = sharding.data_parallel_size(mesh)
        self.batch_size = max(dp, (batch_size // dp) * dp)  # every device gets whole examples
        self.loss_weights = dict(loss_weights)
        self.decode_settings = dict(decode_settings)
        self.n_logged = n_logged
        self._programs = None

    def _build(self, model: nnx.Module):
        graphdef = nnx.graphdef(model)
        w = self.loss_weights

        @jax.jit
        def loss_and_embed(state, image, tokens):
            m = nnx.merge(graphdef, state)
            loss, _ = coca.loss_fn(m, {"image": image, "tokens": tokens}, **w)
            image_embed, _ = m.encode_image(image)
            return loss, image_embed, m.encode_text(tokens)

        return loss_and_embed

    def __call__(self, model: nnx.Module) -> dict[str, Any]:
        if self._programs is None:
            self._programs = self._build(model)
        loss_and_embed = self._programs
        state = nnx.state(model)
        d, bs = self.data, self.batch_size
        n = len(d.captions)
        losses, img_emb, txt_emb, generated = [], [], [], []
        for start, end in _batches(n, bs):
            batch = sharding.replicated_to_global(
                {"image": _pad_to(d.image[start:end], bs), "tokens": _pad_to(d.tokens[start:end], bs)}, self.mesh)
            loss, ie, te = loss_and_embed(state, batch["image"], batch["tokens"])
            tokens = decode.generate(model, batch["image"], **self.decode_settings)
            k = end - start
            losses.append((float(loss), k))
            ie, te, tokens = sharding.to_host((ie, te, tokens))  # whole on every process
            img_emb.append(ie[:k])
            txt_emb.append(te[:k])
            generated.extend(self.tokenize.decode(tokens[:k]))
        scalars = {"val_loss": sum(l * k for l, k in losses) / n, "n_examples": n}
        scalars.update(retrieval_recall_at_1(np.concatenate(img_emb), np.concatenate(txt_emb)))
        if d.scenes is not None:
            scalars.update(caption_quality(generated, d.scenes))
        lines = [f"| {d.ids[i]} | {generated[i]} | {d.captions[i]} |" for i in range(min(self.n_logged, n))]
        table = "| id | generated | reference |\n|---|---|---|\n" + "\n".join(lines)
        return {"scalars": scalars, "texts": {"captions": table}, "captions": generated}


def retrieval_recall_at_1(image_embed: np.ndarray, text_embed: np.ndarray) -> dict[str, float]:
    """Recall@1 of image->text and text->image retrieval where pair i is the match (B x B)."""
    sim = image_embed.astype(np.float32) @ text_embed.astype(np.float32).T
    target = np.arange(len(sim))
    return {"retrieval_i2t_r1": float(np.mean(np.argmax(sim, axis=1) == target)),
            "retrieval_t2i_r1": float(np.mean(np.argmax(sim, axis=0) == target))}


def caption_quality(captions: list[str], scenes: list[Any]) -> dict[str, float]:
    """Mean fact precision / recall and main-subject accuracy of captions against true scenes."""
    from dalle3_jax.data import world

    pr = [world.caption_quality(c, s) for c, s in zip(captions, scenes)]
    main = [world.main_subject_correct(c, s) for c, s in zip(captions, scenes)]
    words = [len(c.split()) for c in captions]
    out = {"fact_precision": float(np.mean([p for p, _ in pr])), "fact_recall": float(np.mean([r for _, r in pr])),
           "main_subject_accuracy": float(np.mean(main)), "caption_words": float(np.mean(words))}
    # Pooled recall per fact kind (shape, colour, count, size, place, background): which part
    # of the scene a captioner misses. Facts are keyed by shape, so a wrong shape also costs
    # that group's colour, count, size and place facts.
    hits, totals = collections.Counter(), collections.Counter()
    for caption, scene in zip(captions, scenes):
        truth = world.scene_facts(scene)
        claimed = world.parse_caption(caption)
        totals.update(f[0] for f in truth)
        hits.update(f[0] for f in truth & claimed)
    out.update({f"fact_recall/{kind}": hits[kind] / totals[kind] for kind in sorted(totals)})
    return out


def evaluator_from_config(config: ml_collections.ConfigDict, mesh, tokenize: tokenizer_lib.Tokenize,
                          n: int | None = None) -> CaptionEvaluator:
    """The evaluator a captioner config asks for (its `eval` block)."""
    from dalle3_jax.data import sources

    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    data_cfg.split = config.eval.split
    if data_cfg.source == "tfds":
        data_cfg.tfds_split = config.eval.split
    source = sources.make_source(data_cfg)
    eval_set = load_eval_set(source, n or config.eval.n_examples, image_size=config.model.image_size,
                             tokenize=tokenize, caption_field=config.eval.caption_field,
                             max_text_len=config.input.max_text_len)
    return CaptionEvaluator(eval_set, tokenize, mesh, batch_size=config.eval.batch_size,
                            loss_weights=dict(config.loss), decode_settings=dict(config.eval.decode),
                            n_logged=config.eval.n_logged)


def evaluate_workdir(workdir: str, n: int | None = None, step: int | None = None) -> dict[str, Any]:
    """Restores the run in `workdir` (its config.json and latest checkpoint) and evaluates it."""
    import os

    from dalle3_jax import checkpoint
    from dalle3_jax.trainers import captioner

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a captioner run directory?")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    mesh = sharding.make_mesh(config.mesh)
    tokenize = tokenizer_lib.Tokenize(tokenizer_lib.load_tokenizer(config.tokenizer or None))
    with jax.set_mesh(mesh):
        model = sharding.create_sharded(lambda: captioner.make_model(config), mesh)
        step = checkpoint.load_model_weights(os.path.join(workdir, "checkpoints"), model, step=step)
        evaluator = evaluator_from_config(config, mesh, tokenize, n)
        result = evaluator(model)
    return {"workdir": workdir, "step": step, **result["scalars"], "examples": result["texts"]["captions"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a captioner run directory")
    parser.add_argument("--n", type=int, default=None, help="eval examples (default: the config's)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    from dalle3_jax import runtime

    runtime.init()
    out = evaluate_workdir(args.workdir, args.n, args.step)
    if args.json:
        print(json.dumps({k: v for k, v in out.items() if k != "examples"}))
    else:
        for k, v in out.items():
            if k != "examples":
                print(f"{k:24s} {v:.4f}" if isinstance(v, float) else f"{k:24s} {v}")
        print(out["examples"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
