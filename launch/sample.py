"""Samples images from a trained T2I run and writes them as one PNG grid.

    python launch/sample.py --workdir=workdirs/t2i_oracle --prompt "a large blue square in the center" --out grid.png
    python launch/sample.py --workdir=DIR --prompts_file prompts.txt --n 4 --guidance 3 --steps 50 \\
        --seed 0 --sampler dpmpp_2m --out grid.png
    OPENAI_API_KEY=... python launch/sample.py --workdir=DIR --prompt "two green stars" --upsample=llm \\
        --upsample_model gpt-4o-mini

Each prompt gets --n images (one grid row per prompt); a prompts file holds one prompt per line
(blank lines and lines starting with # are skipped). The EMA weights of the latest checkpoint are
used unless --no-ema / --step say otherwise. The prompts, in grid order, are written next to the
PNG as <out>.txt.

--upsample=llm rewrites each prompt first into one descriptive prompt (15-80 words) through an
OpenAI-compatible chat endpoint (dalle3_jax/upsample/llm.py; the API key is read from the variable
named by --upsample_api_key_env, never from the command line); --upsample=learned does it with a
local learned upsampler trained by configs/upsampler.py (--upsampler_workdir=DIR; its decoding
settings are the run's, overridden by --upsample_method / --upsample_temperature / --upsample_top_p /
--upsample_top_k; sampling uses --seed). The upsampled prompts are the ones sampled and written to
<out>.txt.

    python launch/sample.py --workdir=DIR --prompt "a green star" --upsample=learned \
        --upsampler_workdir=workdirs/upsampler
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        if not os.path.exists(args.prompts_file):
            raise SystemExit(f"error: --prompts_file {args.prompts_file!r} not found")
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise SystemExit("error: give at least one --prompt or a --prompts_file with prompts")
    return prompts


def add_upsample_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--upsample", default="none", choices=("none", "llm", "learned"),
                        help="rewrite prompts into descriptive ones first (llm: an OpenAI-compatible endpoint; "
                             "learned: a local upsampler run, --upsampler_workdir)")
    parser.add_argument("--upsample_base_url", default=None, help="endpoint base URL (default: https://api.openai.com/v1)")
    parser.add_argument("--upsample_model", default=None, help="chat model name (default: gpt-4o-mini)")
    parser.add_argument("--upsample_api_key_env", default=None,
                        help="environment variable holding the API key (default: OPENAI_API_KEY; '' for none)")
    parser.add_argument("--upsampler_workdir", default=None,
                        help="--upsample=learned: the upsampler run (launch/train.py --config=configs/upsampler.py)")
    parser.add_argument("--upsampler_step", type=int, default=None, help="its checkpoint step (default: latest)")
    parser.add_argument("--upsample_method", default=None, choices=("greedy", "beam", "sample"),
                        help="--upsample=learned decoding (default: the run's, sample)")
    parser.add_argument("--upsample_temperature", type=float, default=None,
                        help="sampling temperature (default: the run's)")
    parser.add_argument("--upsample_top_p", type=float, default=None, help="nucleus mass (default: the run's)")
    parser.add_argument("--upsample_top_k", type=int, default=None, help="top-k, 0 = all (default: the run's)")


def _upsample_learned(args: argparse.Namespace, prompts: list[str]) -> list[str]:
    if not args.upsampler_workdir:
        raise SystemExit("error: --upsample=learned needs --upsampler_workdir=DIR (an upsampler run: "
                         "launch/train.py --config=configs/upsampler.py --workdir=DIR)")
    from dalle3_jax import runtime
    from dalle3_jax.upsample import learned

    runtime.init()
    given = dict(method=args.upsample_method, temperature=args.upsample_temperature, top_p=args.upsample_top_p,
                 top_k=args.upsample_top_k)
    try:
        upsampler = learned.Upsampler.from_workdir(args.upsampler_workdir, step=args.upsampler_step)
        settings = {k: v for k, v in given.items() if v is not None}
        texts = upsampler.upsample(prompts, seed=getattr(args, "seed", 0), **settings)
    except (FileNotFoundError, ValueError) as e:  # PromptError is a ValueError
        raise SystemExit(f"error: --upsample=learned: {e}") from None
    for prompt, text in zip(prompts, texts):
        print(f"upsampled {prompt!r} -> {text!r}", flush=True)
    return texts


def upsample_prompts(args: argparse.Namespace, prompts: list[str]) -> list[str]:
    """The prompts to sample: unchanged, or upsampled as --upsample asks (exits with a clear error)."""
    if args.upsample == "none":
        return prompts
    if args.upsample == "learned":
        return _upsample_learned(args, prompts)
    from dalle3_jax.upsample import llm

    given = dict(base_url=args.upsample_base_url, model=args.upsample_model, api_key_env=args.upsample_api_key_env)
    config = llm.LLMConfig(**{k: v for k, v in given.items() if v is not None})
    try:
        results = llm.LLMUpsampler(config).upsample_results(prompts)
    except llm.UpsampleError as e:
        raise SystemExit(f"error: --upsample=llm: {e}") from None
    for r in results:
        note = "" if r.valid else f" (best effort: {r.words} words, outside {config.min_words}-{config.max_words})"
        print(f"upsampled {r.prompt!r} -> {r.text!r}{note}", flush=True)
    return [r.text for r in results]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a T2I run directory (launch/train.py --config=configs/t2i.py)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    p.add_argument("--prompts_file", help="a text file with one prompt per line")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--out", default="grid.png", help="output PNG")
    from dalle3_jax.trainers import t2i

    t2i.add_sampler_flags(p)
    add_upsample_flags(p)
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be >= 1")
    # Before the model loads, so a misconfigured endpoint fails in seconds.
    prompts = upsample_prompts(args, read_prompts(args))

    import jax
    import numpy as np
    from PIL import Image

    from dalle3_jax import metrics, runtime

    runtime.init()
    config, model, tokenize, mesh, step = t2i.load_run(args.workdir, step=args.step, ema=not args.no_ema)
    overrides = t2i.sampler_overrides(args)
    captions = [c for c in prompts for _ in range(args.n)]
    lengths = tokenize.encode_batch(captions, 512)[1]
    with jax.set_mesh(mesh):
        images = t2i.sample_captions(model, config, tokenize, captions, mesh, seed=args.seed,
                                     max_text_len=max(int(config.input.max_text_len), int(np.max(lengths))),
                                     **overrides)
    grid = metrics.image_grid(images, cols=args.n)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    Image.fromarray(grid).save(args.out)
    with open(os.path.splitext(args.out)[0] + ".txt", "w", encoding="utf-8") as f:
        f.write("\n".join(prompts) + "\n")
    settings = {**config.sample.to_dict(), **overrides}
    print(f"wrote {args.out}: {len(prompts)} prompt(s) x {args.n} image(s), checkpoint step {step}, "
          f"{'EMA' if not args.no_ema and config.ema.enabled else 'trained'} weights, {settings}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
