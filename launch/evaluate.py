"""Stage 5: evaluates a T2I run over its checkpoints, and the caption quality of captioners.

    python launch/evaluate.py --workdir=workdirs/t2i_oracle --clip_workdir=workdirs/eval_clip [--json]
    python launch/evaluate.py --workdir=DIR --clip_workdir=CDIR --steps=latest --n_prompts=64 --k=1 \\
        --sampler=ddim --sampler_steps=25 --guidance=3 --seed=0
    python launch/evaluate.py --captioners=workdirs/captioner_short,workdirs/captioner_descriptive \\
        --caption_n=512 --out=caption_quality.json --json

With --workdir: for every selected checkpoint (--steps all | latest | N,M; default all), images
for the ground-truth short and the descriptive prompts of --n_prompts eval scenes (--k each),
scored with the evaluation CLIP (clip_score_gt, clip_score_descriptive) and, the descriptive ones,
by the scene parser (shape, colour, count, size, place, mean_fact_accuracy, all_facts_correct).
Writes DIR/evaluation.json and TensorBoard scalars under DIR/evaluation/; a rerun with the same
settings skips the steps already done (see dalle3_jax/evals/t2i_eval.py).

With --captioners (DIR,... or name=DIR,...): fact precision / recall and main-subject accuracy of
the world's alt texts, the ground-truth short and descriptive captions, and each captioner's
greedy captions on --caption_n eval scenes; --out writes them as JSON.

--steps selects checkpoints; the sampler's step count is --sampler_steps (in launch/sample.py
and the prompt-following CLI it is --steps). In-process: `evaluate_t2i_run(...)` and
`caption_quality(...)` from dalle3_jax.evals.t2i_eval (also importable from this module).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dalle3_jax.evals.t2i_eval import caption_quality, evaluate_t2i_run  # noqa: E402,F401


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="a T2I run directory (launch/train.py --config=configs/t2i.py), or several "
                   "separated by commas (one process: compiled sampling and the CLIP are reused)")
    p.add_argument("--clip_workdir", help="the evaluation CLIP run (launch/train.py --config=configs/eval_clip.py)")
    p.add_argument("--clip_step", type=int, default=None, help="the CLIP's checkpoint step (default: latest)")
    p.add_argument("--steps", default="all", help="checkpoints to evaluate: all | latest | N,M,... (default all)")
    p.add_argument("--n_prompts", type=int, default=128,
                   help="eval scenes; each gives a short and a descriptive prompt")
    p.add_argument("--k", type=int, default=1, help="images per prompt")
    p.add_argument("--sampler", default=None, help="ddim | ddpm | dpmpp_2m (default: the run's, ddim)")
    p.add_argument("--sampler_steps", type=int, default=None, help="sampler steps (default: the run's, 25)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the run's, 3)")
    p.add_argument("--eta", type=float, default=None, help="DDIM noise: 0 deterministic, 1 DDPM-like")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same for every checkpoint)")
    p.add_argument("--no-ema", action="store_true", help="use the trained weights, not the EMA")
    p.add_argument("--captioners", default="", help="captioner run directories, DIR,... or name=DIR,...")
    p.add_argument("--caption_n", type=int, default=512, help="eval scenes for caption quality")
    p.add_argument("--out", default=None, help="write the caption-quality JSON here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _check_repeated_steps(argv: list[str]) -> None:
    given = [a for a in argv if a == "--steps" or a.startswith("--steps=")]
    if len(given) > 1:
        raise SystemExit("error: --steps given twice: --steps selects checkpoints (all | latest | N,M); "
                         "the sampler's step count is --sampler_steps")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _check_repeated_steps(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.workdir and not args.captioners:
        parser.error("give --workdir (a T2I run) and/or --captioners")
    if args.workdir and not args.clip_workdir:
        parser.error("--workdir needs --clip_workdir (train one with configs/eval_clip.py)")
    if args.k < 1 or args.n_prompts < 1:
        parser.error("--k and --n_prompts must be >= 1")
    from dalle3_jax import runtime

    runtime.init()
    out: dict = {}
    if args.workdir:
        sampler = dict(sampler=args.sampler, sampler_steps=args.sampler_steps, guidance=args.guidance, eta=args.eta)
        runs = [w for w in args.workdir.split(",") if w]
        results = {w: evaluate_t2i_run(w, args.clip_workdir, steps=args.steps, n_prompts=args.n_prompts, k=args.k,
                                       seed=args.seed, ema=not args.no_ema, clip_step=args.clip_step,
                                       **{k: v for k, v in sampler.items() if v is not None}) for w in runs}
        out = results[runs[0]] if len(runs) == 1 else {"runs": results}
    if args.captioners:
        quality = caption_quality(args.captioners, n=args.caption_n)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(quality, f, indent=1)
        out = {**out, "caption_quality": quality} if args.workdir else quality
    if args.json:
        print(json.dumps(out))
    else:
        _print_human(out, bool(args.workdir))
    return 0


def _print_human(out: dict, t2i: bool) -> None:
    quality = out.get("caption_quality", out if not t2i else {})
    for run in (out["runs"].values() if "runs" in out else [out]) if t2i else []:
        keys = ("clip_score_gt", "clip_score_descriptive", "mean_fact_accuracy", "all_facts_correct",
                "shape", "colour", "count", "size", "place")
        print(run.get("workdir", ""))
        print("step     " + " ".join(f"{k[:22]:>22s}" for k in keys))
        rows = [("ref", run.get("reference") or {})] + list(run["steps"].items())
        for step, m in rows:
            print(f"{step:8s} " + " ".join(f"{m.get(k, float('nan')):22.3f}" for k in keys))
    if quality:
        print(f"{'captions':16s} {'fact_precision':>15s} {'fact_recall':>12s} {'main_subject':>13s}")
        for name, q in quality.items():
            print(f"{name:16s} {q['fact_precision']:15.3f} {q['fact_recall']:12.3f} {q['main_subject_accuracy']:13.3f}")


if __name__ == "__main__":
    sys.exit(main())
