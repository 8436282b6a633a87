"""Stage 5: a T2I run's checkpoints scored over training (CLIP score and prompt following), and
caption quality of the captions the recipe compares. `launch/evaluate.py` is the command line.

For every selected checkpoint of a T2I run (EMA weights by default), with one sampler seed:
  (a) an image for each ground-truth short prompt of the first `n_prompts` scenes of the world's
      eval split ("a red circle"), k per prompt;
  (b) an image for each descriptive prompt of the same scenes, k per prompt.
Reported per step:
  clip_score_gt            mean CLIP score (evals/clip_score.py) of the (a) images with their prompts
  clip_score_descriptive   mean CLIP score of the (b) images with their prompts
  shape colour count size place background mean_fact_accuracy all_facts_correct
                           prompt following of the (b) images (evals/prompt_following.py), parsed
                           by the scene parser: the same images are CLIP-scored and parsed
  clip_score_gt_se, clip_score_descriptive_se   standard errors of the two means
Scenes are those the run trained on (one object per scene when data.world.single_object).
`reference` holds the same figures for the world's own renders of the prompted scenes: the
ceiling a perfect model would reach with this CLIP and this parser.

Results go to DIR/evaluation.json:
    {"workdir", "settings": {...}, "reference": {...}, "steps": {"200": {...}, "400": {...}}}
and TensorBoard scalars `evaluate/<metric>` (plus a few samples) under DIR/evaluation/. A rerun
with the same settings (CLIP run and step, prompts, k, seed, sampler, weights) skips the steps
already there, so it is cheap; other settings start the file afresh. The file is rewritten
after every step, so an interrupted evaluation keeps what it finished.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

EVALUATION_FILE = "evaluation.json"
METRICS = ("clip_score_gt", "clip_score_descriptive", "shape", "colour", "count", "size", "place", "background",
           "mean_fact_accuracy", "all_facts_correct")
# Sampler settings evaluate_t2i_run accepts (`sampler_steps` is the sampler's `steps`: the name
# `steps` selects checkpoints).
SAMPLER_KEYS = ("sampler", "sampler_steps", "guidance", "eta", "clip_x0")


def list_steps(workdir: str) -> list[int]:
    """The finished checkpoint steps of a run directory, oldest first."""
    from dalle3_jax import checkpoint

    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    ckpt = checkpoint.Checkpointer(directory, read_only=True)
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


def select_steps(spec: str | int | Iterable[int], available: Sequence[int]) -> list[int]:
    """Checkpoint steps for `spec`: "all", "latest", "N,M,..." (or an int / list of ints)."""
    available = sorted(int(s) for s in available)
    if not available:
        raise FileNotFoundError("the run has no checkpoints")
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return available
        if text == "latest":
            return available[-1:]
        try:
            wanted = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"steps={spec!r}: expected all, latest or comma-separated checkpoint steps") from None
    elif isinstance(spec, int):
        wanted = [spec]
    else:
        wanted = [int(x) for x in spec]
    missing = sorted(set(wanted) - set(available))
    if missing or not wanted:
        raise ValueError(f"steps={spec!r}: no checkpoint for {missing or 'any step'}; available: {available}")
    return sorted(set(wanted))


def _sampler_overrides(sampler: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(sampler) - set(SAMPLER_KEYS)
    if unknown:
        raise TypeError(f"unknown sampler settings {sorted(unknown)}; valid: {', '.join(SAMPLER_KEYS)}")
    out = {("steps" if k == "sampler_steps" else k): v for k, v in sampler.items() if v is not None}
    return out


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: str, data: Mapping[str, Any]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=False)
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    x = np.asarray(x, np.float64)
    se = float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0
    return float(np.mean(x)), se


def score_images(scorer, short_images: np.ndarray, short_texts: list[str], descriptive_images: np.ndarray,
                 descriptive_texts: list[str], scenes: list[Any]) -> dict[str, float]:
    """The per-step metrics (see the module docstring) of already generated images."""
    from dalle3_jax.evals import prompt_following

    gt, gt_se = _mean_se(scorer.score(short_images, short_texts))
    desc, desc_se = _mean_se(scorer.score(descriptive_images, descriptive_texts))
    out = {"clip_score_gt": gt, "clip_score_descriptive": desc}
    out.update(prompt_following.score_images(descriptive_images, scenes))
    out.update(clip_score_gt_se=gt_se, clip_score_descriptive_se=desc_se)
    return out


def evaluate_t2i_run(workdir: str, clip_workdir: str, *, steps: str | int | Iterable[int] = "all",
                     n_prompts: int = 128, k: int = 1, seed: int = 0, ema: bool = True, clip_step: int | None = None,
                     output: str = EVALUATION_FILE, **sampler: Any) -> dict[str, Any]:
    """Evaluates checkpoints `steps` ("all", "latest", "N,M" or ints) of the T2I run in `workdir`
    with the evaluation CLIP in `clip_workdir` (checkpoint `clip_step`, latest by default).

    `sampler` overrides the run's config.sample: sampler, sampler_steps (the sampler's step
    count), guidance, eta, clip_x0. Returns the content of DIR/`output` (see the module
    docstring; "steps" maps str(step) -> metrics, as in the JSON file) after writing it.
    """
    import jax
    import ml_collections

    from dalle3_jax.evals import clip_score, prompt_following
    from dalle3_jax.trainers import t2i

    if k < 1 or n_prompts < 1:
        raise ValueError(f"need k >= 1 and n_prompts >= 1, got k={k}, n_prompts={n_prompts}")
    overrides = _sampler_overrides(sampler)
    raw = _read_json(os.path.join(workdir, "config.json"))
    if raw is None:
        raise FileNotFoundError(f"{os.path.join(workdir, 'config.json')} not found: "
                                f"is {workdir!r} a T2I run directory?")
    config = ml_collections.ConfigDict(raw)
    if config.get("trainer") != "t2i":
        raise ValueError(f"{workdir!r} is a {config.get('trainer')!r} run, not a T2I run")
    selected = select_steps(steps, list_steps(workdir))
    clip_steps = list_steps(clip_workdir)
    if not clip_steps:
        raise FileNotFoundError(f"no evaluation CLIP checkpoints in {clip_workdir!r}: train one with "
                                f"launch/train.py --config=configs/eval_clip.py --workdir={clip_workdir}")
    clip_step = clip_steps[-1] if clip_step is None else int(clip_step)
    single = bool(config.data.get("world", {}).get("single_object", False))
    with open(os.path.join(clip_workdir, "config.json")) as f:
        clip_world = json.load(f).get("data", {}).get("world", {})
    settings = {
        "clip_workdir": os.path.abspath(clip_workdir), "clip_step": clip_step,
        "n_prompts": int(n_prompts), "k": int(k), "seed": int(seed), "ema": bool(ema and config.ema.enabled),
        "prompt_split": "eval", "single_object": single,
        "sampler": {**config.sample.to_dict(), **overrides},
    }
    if bool(clip_world.get("single_object", False)) != single:
        log.warning("the evaluation CLIP was trained with single_object=%s but the T2I run uses %s: its scores "
                    "are out of its training distribution", clip_world.get("single_object", False), single)
    path = os.path.join(workdir, output)
    previous = _read_json(path)
    if previous is not None and previous.get("settings") != settings:
        log.warning("%s was made with other settings; evaluating afresh (was %s, now %s)", path,
                    previous.get("settings"), settings)
        previous = None
    result = previous or {"workdir": os.path.abspath(workdir), "settings": settings, "reference": None, "steps": {}}
    todo = [s for s in selected if str(s) not in result["steps"]]
    skipped = [s for s in selected if str(s) in result["steps"]]
    if skipped:
        log.info("evaluate %s: steps %s already in %s with the same settings; skipped", workdir, skipped, output)
    if not todo and result.get("reference") is not None:
        return result

    from dalle3_jax import metrics as metrics_lib

    scorer = clip_score.ClipScorer.from_workdir(clip_workdir, step=clip_step)
    prompts = prompt_following.load_prompts(config, int(n_prompts), single_object=single)
    short = [c for c in prompts.short for _ in range(k)]
    descriptive = [c for c in prompts.captions for _ in range(k)]
    scenes = [s for s in prompts.scenes for _ in range(k)]
    writer = metrics_lib.MetricWriter(os.path.join(workdir, "evaluation"))
    try:
        if result.get("reference") is None:
            result["reference"] = _reference(scorer, config, prompts)
            _write_json(path, result)
        for step in todo:
            t0 = time.perf_counter()
            cfg, model, tokenize, mesh, got = t2i.load_run(workdir, step=step, ema=ema)
            with jax.set_mesh(mesh):
                gen = dict(k=k, seed=seed, **overrides)
                short_images = prompt_following.generate_images(model, cfg, tokenize, mesh, prompts.short, **gen)
                desc_images = prompt_following.generate_images(model, cfg, tokenize, mesh, prompts.captions, **gen)
            row = score_images(scorer, short_images, short, desc_images, descriptive, scenes)
            row["seconds"] = time.perf_counter() - t0
            result["steps"][str(got)] = row
            result["steps"] = dict(sorted(result["steps"].items(), key=lambda kv: int(kv[0])))
            _write_json(path, result)
            writer.write_scalars(got, {f"evaluate/{m}": row[m] for m in METRICS})
            writer.write_images(got, {"evaluate/descriptive_samples": desc_images[:16],
                                      "evaluate/short_samples": short_images[:16]})
            writer.flush()
            log.info("evaluate %s step %d (%.0fs): %s", workdir, got, row["seconds"],
                     ", ".join(f"{m} {row[m]:.3f}" for m in METRICS))
    finally:
        writer.close()
    return result


def _reference(scorer, config, prompts) -> dict[str, float]:
    """The metrics of the world's own renders of the prompted scenes (a perfect model's figures)."""
    from dalle3_jax.data import world

    size = int(config.input.image_size)
    images = np.stack([world.render(s, int(config.data.get("world", {}).get("image_size", max(size, 32))))
                       for s in prompts.scenes])
    if images.shape[1] != size:  # the model's resolution: what a generated image would be
        from dalle3_jax.data import pipeline

        images = np.stack([pipeline.resize_square(im, size) for im in images])
    return score_images(scorer, images, prompts.short, images, prompts.captions, prompts.scenes)


# ------------------------------------------------------------------------------------------------
# Caption quality
# ------------------------------------------------------------------------------------------------


def parse_captioners(spec: str | Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """{name: workdir} from "DIR1,DIR2" / "ssc=DIR1,dsc=DIR2" (name: the directory's basename)."""
    if isinstance(spec, Mapping):
        return {str(k): str(v) for k, v in spec.items()}
    items = [x.strip() for x in (spec.split(",") if isinstance(spec, str) else spec) if x and x.strip()]
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(item)), item
        if name in out:
            raise ValueError(f"two captioners named {name!r}; write name=DIR")
        out[name] = path
    return out


def caption_quality(captioners: str | Sequence[str] | Mapping[str, str] = (), *, n: int = 512,
                    world: Mapping[str, Any] | None = None, split: str = "eval") -> dict[str, dict[str, Any]]:
    """Fact precision / recall, main-subject accuracy and recall per fact kind (evals/captions.py)
    on the first n scenes of the world's `split`, for

      alt             the world's alt texts (what the alt-only model trains on)
      gt_short        the ground-truth short captions
      gt_descriptive  the ground-truth descriptive captions (precision and recall 1 by design)
      <name>          each captioner run's greedy captions (its latest checkpoint)

    The world settings (image size, one object per scene) are `world`, else the first
    captioner's, else the world's defaults. Returns {source: figures}.
    """
    from dalle3_jax.data import world as world_lib
    from dalle3_jax.evals import captions as caption_evals

    runs = parse_captioners(captioners)
    if world is None:
        world = {}
        for path in runs.values():
            cfg = _read_json(os.path.join(path, "config.json"))
            if cfg is None:
                raise FileNotFoundError(f"{path}/config.json not found: is {path!r} a captioner run directory?")
            world = cfg.get("data", {}).get("world", {}) or {}
            break
    src = world_lib.WorldSource(split, world_lib.WorldConfig(**dict(world)))
    records = [src[i] for i in range(min(int(n), len(src)))]
    scenes = [world_lib.Scene.from_json(r["scene"]) for r in records]
    out: dict[str, dict[str, Any]] = {}
    for name, field in (("alt", "alt"), ("gt_short", "short"), ("gt_descriptive", "descriptive")):
        out[name] = {**caption_evals.caption_quality([r["captions"][field] for r in records], scenes),
                     "n_examples": len(records)}
    for name, path in runs.items():
        figures = caption_evals.evaluate_workdir(path, n=int(n))
        figures.pop("examples", None)
        out[name] = figures
    return out
