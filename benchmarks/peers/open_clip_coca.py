"""The open_clip side of bench_captioner.py: its CoCa, trained and captioning at given dimensions.

Runs in its own virtual environment (torch, open_clip_torch, transformers 4.55: open_clip's
`generate` imports transformers' BeamSearchScorer, gone from the 4.57+ top level), started by
bench_captioner.py, which passes the dimensions and reads back the one JSON line this prints on
stdout (progress goes to stderr):

    python benchmarks/peers/open_clip_coca.py --image-size 64 --patch 8 --width 256 ...

What is timed, after warm-up, torch eager on the CPU with torch.set_num_threads(cpu count):
  train     one AdamW step = forward, open_clip.loss.CoCaLoss (contrastive weight 1, caption
            weight 2), backward, global-norm clipping to 1.0 (as our step does), optimizer step.
            Weight decay only on matrices (open_clip_train's own grouping). AdamW uses torch's
            fused CPU kernel when this torch has one (the fastest stock setting, not a handicap).
  generate  `model.generate(generation_type="top_k", top_k=1)`: keep the single most likely
            token and sample from it, i.e. greedy decoding. It is the cheapest greedy-equivalent
            path open_clip offers: "beam_search" with one beam still runs the Python beam
            bookkeeping of transformers' BeamSearchScorer per image. seq_len = new tokens + 1
            (open_clip counts the start token), min_seq_len = new tokens (eos is banned until
            open_clip forces it at the last step) and fixed_output_length=True, so every call
            runs exactly `new_tokens` forward passes, as ours does. Each pass re-runs the text
            towers over the whole prefix: that is how open_clip decodes (no KV cache).

The model is built from a config dict, like open_clip's model_configs/coca_*.json (the
original open_clip CoCa: one attentional pooler whose first query is the contrastive token and
whose others are the caption tokens), with random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_common import matmul_peak_flops, seconds_per_call  # noqa: E402
from torch_common import log as _log  # noqa: E402


def log(msg: str) -> None:
    _log("open_clip peer", msg)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--width", type=int, default=256, help="ViT, text and multimodal width (and embed_dim)")
    p.add_argument("--vit-layers", type=int, default=4)
    p.add_argument("--vit-heads", type=int, default=4)
    p.add_argument("--text-heads", type=int, default=4)
    p.add_argument("--unimodal-layers", type=int, default=4)
    p.add_argument("--multimodal-layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--context", type=int, default=32, help="text length (tokens incl. start and end)")
    p.add_argument("--pool-queries", type=int, default=256, help="attentional pooler queries (open_clip's default)")
    p.add_argument("--pool-heads", type=int, default=8, help="attentional pooler heads (open_clip CoCa configs)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train-iters", type=int, default=8)
    p.add_argument("--decode-iters", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--peak-size", type=int, default=2048, help="side of the torch matmul peak probe")
    return p.parse_args(argv)


def model_config(a: argparse.Namespace) -> dict:
    """An open_clip CoCa config dict at the given dimensions (fields as in coca_ViT-B-32.json)."""
    return {
        # The multimodal decoder cross-attends to the pooler's outputs, whose width is embed_dim,
        # so open_clip's CoCa needs embed_dim == the multimodal width.
        "embed_dim": a.width,
        "vision_cfg": {
            "image_size": a.image_size, "patch_size": a.patch, "width": a.width, "layers": a.vit_layers,
            "head_width": a.width // a.vit_heads, "attentional_pool": True,
            "attn_pooler_queries": a.pool_queries, "attn_pooler_heads": a.pool_heads, "output_tokens": True,
        },
        "text_cfg": {
            "context_length": a.context, "vocab_size": a.vocab, "width": a.width, "heads": a.text_heads,
            "layers": a.unimodal_layers, "embed_cls": True, "output_tokens": True,
        },
        "multimodal_cfg": {
            "context_length": a.context, "vocab_size": a.vocab, "width": a.width, "heads": a.text_heads,
            "layers": a.multimodal_layers, "attn_pooler_heads": a.pool_heads,
        },
    }


def main(argv=None) -> None:
    a = parse_args(argv)
    import open_clip
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    pad_id, bos_id, eos_id = 0, 1, 2  # the same special ids as our side

    # Matmul peak as torch sees it (best of 5), to tell a slower model from a slower BLAS.
    peak = matmul_peak_flops(a.peak_size)

    cfg = model_config(a)
    model = open_clip.CoCa(**cfg, pad_id=pad_id)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"open_clip {open_clip.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{n_params:,} parameters")

    images = torch.rand(a.batch, 3, a.image_size, a.image_size) * 2 - 1
    # bos, random words, eos: full-length captions, no padding (the same shape of data as ours).
    tokens = torch.randint(3, a.vocab, (a.batch, a.context))
    tokens[:, 0], tokens[:, -1] = bos_id, eos_id

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.98), eps=1e-8, fused=True)
        fused = True
    except (RuntimeError, ValueError, TypeError):  # a torch without the fused CPU kernel
        opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.98), eps=1e-8, foreach=True)
        fused = False
    loss_fn = open_clip.loss.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=pad_id)

    def train_step():
        out = model(images, tokens)
        clip_loss, caption_loss = loss_fn(out["image_features"], out["text_features"], out["logits"],
                                          out["labels"], out["logit_scale"])
        opt.zero_grad(set_to_none=True)
        (clip_loss + caption_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    model.train()
    log(f"train: {a.warmup} warm-up + {a.train_iters} timed steps at batch {a.batch}")
    train_s = seconds_per_call(train_step, a.train_iters, a.warmup)

    def generate():
        return model.generate(images, seq_len=a.new_tokens + 1, max_seq_len=a.context, generation_type="top_k",
                              top_k=1, pad_token_id=pad_id, eos_token_id=eos_id, sot_token_id=bos_id,
                              min_seq_len=a.new_tokens, fixed_output_length=True)

    model.eval()
    log(f"generate: 1 warm-up + {a.decode_iters} timed calls, {a.new_tokens} tokens, batch {a.batch}")
    out = generate()
    assert out.shape == (a.batch, a.new_tokens + 1), out.shape
    # A row whose argmax hits the pad id stops early (its compute is still done with the batch).
    stopped_early = int((out[:, 1:-1] == pad_id).any(dim=1).sum())
    gen_s = seconds_per_call(generate, a.decode_iters, warmup=0)

    result = {
        "open_clip_train_images_per_s": a.batch / statistics.median(train_s),
        "open_clip_generate_captions_per_s": a.batch / statistics.median(gen_s),
        "open_clip_train_step_seconds": train_s,
        "open_clip_generate_seconds": gen_s,
        "open_clip_params": n_params,
        "open_clip_generate_rows_stopped_early": stopped_early,
        "open_clip_adamw_fused": fused,
        "torch_matmul_peak_gflops": peak / 1e9,
        "torch_threads": torch.get_num_threads(),
        "open_clip_version": open_clip.__version__,
        "torch_version": torch.__version__,
        "open_clip_config": cfg,
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
