"""The pipeline's report: <workdir>/report.md with its PNG figures under <workdir>/report/.

It reads what the stages left behind (each T2I run's evaluation.json, the caption-quality JSON,
the recaptioned records, the stage records) and adds the one thing no stage makes: side-by-side
samples of every model for the same prompts, and, when the learned upsampler was trained,
prompt following from short prompts with and without upsampling. `write_report` returns the
headline figures that `launch/pipeline.py --json` prints.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections
import numpy as np

from dalle3_jax.evals import plots

HEADLINE_KEYS = ("clip_score_gt", "clip_score_descriptive", "mean_fact_accuracy", "all_facts_correct")
FACT_KEYS = ("shape", "colour", "count", "size", "place", "mean_fact_accuracy", "all_facts_correct")


def load_curve(run_dir: str) -> list[tuple[int, dict]]:
    """[(step, metrics)] of a T2I run's evaluation.json (launch/evaluate.py), sorted by step."""
    path = os.path.join(run_dir, "evaluation.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run launch/evaluate.py --workdir={run_dir} first")
    with open(path) as f:
        data = json.load(f)
    return sorted((int(step), metrics) for step, metrics in data["steps"].items())


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    # Captions are arbitrary text (an untrained captioner emits anything): keep them on one table row.
    return "—" if x is None else str(x).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def caption_examples(records_dir: str, n: int) -> list[dict]:
    """The first n recaptioned records: id, alt, SSC, DSC and the world's ground truths."""
    from dalle3_jax.data import sources

    data = ml_collections.ConfigDict(dict(source="arrayrecord", arrayrecord_pattern=records_dir, split="train"))
    src = sources.make_source(data)
    out = []
    for i in range(min(n, len(src))):
        caps = src[i].get("captions", {})
        out.append({"id": src[i].get("id"), **{k: caps.get(k) for k in ("alt", "ssc", "dsc", "short", "descriptive")}})
    return out


def _sample_models(config, workdir: str, names: list[str], prompts: list[str]) -> dict[str, np.ndarray]:
    """One image per prompt from each T2I model (EMA weights of its last checkpoint), same seed."""
    import jax

    from dalle3_jax.trainers import t2i

    e = config.evaluate
    out = {}
    for name in names:
        cfg, model, tokenize, mesh, _ = t2i.load_run(os.path.join(workdir, f"t2i_{name}"))
        lengths = tokenize.encode_batch(prompts, 512)[1]
        with jax.set_mesh(mesh):
            out[name] = t2i.sample_captions(model, cfg, tokenize, prompts, mesh, seed=int(config.seed),
                                            max_text_len=max(int(cfg.input.max_text_len), int(np.max(lengths))),
                                            sampler=e.sampler, steps=int(e.sampler_steps), guidance=float(e.guidance))
    return out


def _subject_scores(images: np.ndarray, scenes: list) -> dict[str, float]:
    """Shape, colour and count accuracy of each scene's main subject: the facts a short prompt states."""
    from dalle3_jax.data import world
    from dalle3_jax.evals import prompt_following

    hits = {f: [] for f in ("shape", "colour", "count")}
    for image, scene in zip(images, scenes):
        main_only = dataclasses.replace(scene, groups=(scene.main_subject,))
        s = prompt_following.score_scene(main_only, world.parse_image(image))
        for f in hits:
            hits[f].append(s["hits"][f][0])
    out = {f: float(np.mean(v)) for f, v in hits.items()}
    out["subject_all_correct"] = float(np.mean([all(hits[f][i] == 1.0 for f in hits) for i in range(len(images))]))
    return out


def upsampling_eval(config, workdir: str, model_name: str) -> dict[str, Any]:
    """Prompt following from the eval split's ground-truth short prompts through `model_name`,
    as typed and after the learned upsampler rewrote them."""
    import jax

    from dalle3_jax.evals import prompt_following
    from dalle3_jax.trainers import t2i
    from dalle3_jax.upsample import learned

    cfg, model, tokenize, mesh, _ = t2i.load_run(os.path.join(workdir, f"t2i_{model_name}"))
    n = int(config.evaluate.n_prompts)
    prompts = prompt_following.load_prompts(cfg, n, single_object=bool(config.world.single_object))
    shorts = [_short_caption(cfg, i) for i in range(len(prompts.scenes))]
    upsampled = learned.Upsampler.from_workdir(os.path.join(workdir, "upsampler")).upsample(shorts, seed=int(config.seed))
    e = config.evaluate
    out: dict[str, Any] = {"model": model_name, "n_prompts": len(shorts),
                           "examples": [{"short": s, "upsampled": u} for s, u in list(zip(shorts, upsampled))[:4]]}
    for label, texts in (("short", shorts), ("upsampled", upsampled)):
        lengths = tokenize.encode_batch(texts, 512)[1]
        with jax.set_mesh(mesh):
            images = t2i.sample_captions(model, cfg, tokenize, texts, mesh, seed=int(config.seed),
                                         max_text_len=max(int(cfg.input.max_text_len), int(np.max(lengths))),
                                         sampler=e.sampler, steps=int(e.sampler_steps), guidance=float(e.guidance))
        out[label] = _subject_scores(images, prompts.scenes)
    return out


def _short_caption(cfg, index: int) -> str:
    from dalle3_jax.data import world

    overrides = dict(cfg.data.world.to_dict())
    return world.WorldSource("eval", world.WorldConfig(**overrides))[index]["captions"]["short"]


def headline(config, curves: dict[str, list[tuple[int, dict]]], stage_records: dict[str, dict]) -> dict[str, Any]:
    """The figures `--json` prints: per model its last evaluated checkpoint's headline metrics,
    and every stage's wall time (from this run, or from the run that finished it)."""
    out: dict[str, Any] = {"variant": config.variant, "world": config.world.to_dict()}
    for name, points in curves.items():
        step, metrics = points[-1]
        out[name] = {"step": step, **{k: metrics.get(k) for k in HEADLINE_KEYS}}
    out["stage_wall_s"] = {name: rec["wall_s"] for name, rec in stage_records.items()}
    out["stages_skipped"] = [name for name, rec in stage_records.items() if rec.get("skipped")]
    return out


def write_report(config: ml_collections.ConfigDict, workdir: str, stages: list, stage_records: dict[str, dict]) -> dict:
    """Writes report.md and its figures; returns the headline (see `headline`)."""
    from dalle3_jax import runtime
    from dalle3_jax.evals import prompt_following

    runtime.init()
    rdir = os.path.join(workdir, "report")
    os.makedirs(rdir, exist_ok=True)
    names = list(config.t2i.runs)
    curves = {name: load_curve(os.path.join(workdir, f"t2i_{name}")) for name in names}
    head = headline(config, curves, stage_records)
    rel = lambda p: os.path.relpath(p, workdir)  # noqa: E731
    figs = {"clip": plots.clip_score_panels(curves, os.path.join(rdir, "clip_score.png")),
            "pf": plots.prompt_following_panels(curves, os.path.join(rdir, "prompt_following.png"))}
    dsc_runs = [(float(r.blend), curves[n][-1][1]) for n, r in config.t2i.runs.items() if r.caption == "dsc"]
    if len(dsc_runs) > 1:
        alt = [curves[n][-1][1] for n, r in config.t2i.runs.items() if r.caption == "alt"]
        figs["blend"] = plots.blend_ablation(dsc_runs + [(0.0, m) for m in alt], os.path.join(rdir, "blend.png"))

    # Side-by-side samples for the same held-out descriptive prompts.
    from dalle3_jax.trainers import loop

    cfg0 = loop.load_run_config(os.path.join(workdir, f"t2i_{names[0]}"), "t2i")
    grid_prompts = prompt_following.load_prompts(cfg0, int(config.evaluate.n_grid),
                                                 single_object=bool(config.world.single_object)).captions
    samples = _sample_models(config, workdir, names, grid_prompts)
    figs["samples"] = plots.side_by_side(samples, grid_prompts, os.path.join(rdir, "samples.png"))

    upsampling = None
    best = next((n for n in reversed(names) if config.t2i.runs[n].caption == "dsc"), None)
    if config.upsampler.enabled and best and os.path.isdir(os.path.join(workdir, "upsampler")):
        upsampling = upsampling_eval(config, workdir, best)
        head["upsampling"] = {k: upsampling[k] for k in ("short", "upsampled")}

    quality_path = os.path.join(rdir, "caption_quality.json")
    quality = {}
    if os.path.exists(quality_path):
        with open(quality_path) as f:
            quality = json.load(f)
    examples = caption_examples(os.path.join(workdir, "recaption"), int(config.evaluate.n_caption_examples))

    md = _markdown(config, head, curves, figs, rel, samples_prompts=grid_prompts, quality=quality,
                   examples=examples, upsampling=upsampling, stages=stages)
    with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
        f.write(md)
    with open(os.path.join(rdir, "headline.json"), "w") as f:
        json.dump(head, f, indent=1)
    return head


_VARIANT_NOTES = {
    "tiny": "This is the tiny smoke variant: seconds of training per stage, so its numbers mean nothing.",
    "quick": ("This is the quick variant: a simpler slice of the world and minutes of training per stage, so "
              "absolute numbers are far below what longer runs reach; the comparison between caption types is "
              "the point."),
    "full": "This is the full variant: the paper's experiment, with the blend ablation.",
}


def _markdown(config, head, curves, figs, rel, *, samples_prompts, quality, examples, upsampling, stages) -> str:
    w = config.world
    slice_ = "one object per scene" if w.single_object else "scenes of 1-4 groups of objects"
    out = [f"# dalle3_jax pipeline report ({config.variant})", "",
           f"World: the built-in synthetic shapes world, {slice_}, {w.image_size}x{w.image_size} px. "
           + _VARIANT_NOTES[config.variant], ""]
    out += ["## Does training on descriptive synthetic captions improve prompt following?", "",
            "Last evaluated checkpoint of each T2I model. CLIP score (evaluation CLIP trained only on the judge "
            "split) on ground-truth short prompts and on descriptive prompts; prompt following parsed exactly "
            "from the generated images for held-out descriptive prompts.", ""]
    rows = []
    for name, points in curves.items():
        step, m = points[-1]
        rows.append([name, step, m.get("clip_score_gt"), m.get("clip_score_descriptive")]
                    + [m.get(k) for k in FACT_KEYS])
    out += [_table(["model", "step", "CLIP short", "CLIP descriptive"] + list(FACT_KEYS), rows), ""]
    out += [f"![CLIP score versus training step]({rel(figs['clip'])})", "",
            f"![prompt following versus training step]({rel(figs['pf'])})", ""]
    if "blend" in figs:
        out += ["## Blend ablation", "", f"![blend ablation]({rel(figs['blend'])})", ""]
    out += ["## Samples", "", "The same held-out descriptive prompts and seed through every model "
            f"({config.evaluate.sampler}, {config.evaluate.sampler_steps} steps, guidance {config.evaluate.guidance}).",
            "", f"![side-by-side samples]({rel(figs['samples'])})", ""]
    if upsampling:
        out += ["## Prompt upsampling", "",
                f"Ground-truth short prompts of {upsampling['n_prompts']} eval scenes through t2i_{upsampling['model']}, "
                "as typed and after the learned upsampler; scored on the facts the short prompt states (the main "
                "subject's shape, colour and count).", "",
                _table(["prompts", "shape", "colour", "count", "subject all correct"],
                       [[label] + [upsampling[label][k] for k in ("shape", "colour", "count", "subject_all_correct")]
                        for label in ("short", "upsampled")]), "",
                _table(["short prompt", "upsampled"], [[x["short"], x["upsampled"]] for x in upsampling["examples"]]), ""]
    if quality:
        rows = [[name] + [q.get(k) for k in ("fact_precision", "fact_recall", "main_subject_accuracy")]
                for name, q in quality.items() if isinstance(q, dict)]
        out += ["## Caption quality", "", "Facts claimed by each caption source against the true scenes.", "",
                _table(["captions", "fact precision", "fact recall", "main subject accuracy"], rows), ""]
    if examples:
        out += ["## Caption examples", "", "The first recaptioned training images.", "",
                _table(["id", "alt", "SSC", "DSC", "ground-truth descriptive"],
                       [[x["id"], x["alt"], x["ssc"], x["dsc"], x["descriptive"]] for x in examples]), ""]
    out += ["## Stages", "", _table(["stage", "what", "wall time (s)", "this run"],
                                    [[s.name, s.title, round(head["stage_wall_s"].get(s.name, 0.0), 1),
                                      "skipped (done earlier)" if s.name in head["stages_skipped"] else "ran"]
                                     for s in stages]), ""]
    return "\n".join(out)
