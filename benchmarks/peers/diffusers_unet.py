"""The diffusers side of bench_unet.py: UNet2DConditionModel trained at given dimensions.

Runs in its own virtual environment (torch==2.13.0, diffusers), started by bench_unet.py,
which passes the dimensions and reads back the one JSON line this prints on stdout (progress
goes to stderr):

    python benchmarks/peers/diffusers_unet.py --image-size 32 --channels 64,128,128 --layers 2 ...

The model: `UNet2DConditionModel` with block_out_channels = --channels, layers_per_block =
--layers, a plain ResNet down block at the first (full) resolution and cross-attention down
blocks at the others (mirrored on the way up), cross-attention dim --context-dim, `--heads`
heads per attention, GroupNorm with --groups groups. At the defaults this is the 10.4M-parameter
model of the issue, the counterpart of our UNet "B" with attention at 16, 8 and the bottleneck.

What is timed, after warm-up, torch eager on the CPU with torch.set_num_threads(cpu count): one
AdamW step = forward on noisy images [B, 3, S, S] with timesteps and text states [B, L, Dc],
MSE against a random target (a v-prediction step's shape of work), backward, global-norm
clipping to 1.0 (as our step does), optimizer step. AdamW uses torch's fused CPU kernel when
this torch has one. FLOPs: torch.utils.flop_counter over one forward + backward (matmuls and
convolutions, 2 per multiply-add), the same kinds our side counts.
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
    _log("diffusers peer", msg)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", default="64,128,128", help="block_out_channels, comma-separated")
    p.add_argument("--layers", type=int, default=2, help="layers_per_block")
    p.add_argument("--context-dim", type=int, default=256, help="cross_attention_dim")
    p.add_argument("--context-len", type=int, default=32, help="text tokens L")
    p.add_argument("--heads", type=int, default=8, help="attention heads (diffusers' attention_head_dim)")
    p.add_argument("--groups", type=int, default=32, help="GroupNorm groups")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train-iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-size", type=int, default=2048)
    return p.parse_args(argv)


def model_kwargs(a: argparse.Namespace) -> dict:
    """UNet2DConditionModel arguments at the given dimensions."""
    channels = tuple(int(c) for c in a.channels.split(","))
    n = len(channels)
    return dict(sample_size=a.image_size, in_channels=3, out_channels=3, block_out_channels=channels,
                layers_per_block=a.layers, cross_attention_dim=a.context_dim, attention_head_dim=a.heads,
                norm_num_groups=a.groups,
                down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
                up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",))


def main(argv=None) -> None:
    a = parse_args(argv)
    import diffusers
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    peak = matmul_peak_flops(a.peak_size)
    kwargs = model_kwargs(a)
    model = diffusers.UNet2DConditionModel(**kwargs)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"diffusers {diffusers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{n_params:,} parameters")
    x = torch.randn(a.batch, 3, a.image_size, a.image_size)
    t = torch.randint(0, 1000, (a.batch,))
    context = torch.randn(a.batch, a.context_len, a.context_dim)
    target = torch.randn_like(x)
    # The T2I recipe's optimizer: AdamW, b2 0.999, no weight decay.
    settings = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    try:
        opt = torch.optim.AdamW(model.parameters(), fused=True, **settings)
        fused = True
    except (RuntimeError, ValueError, TypeError):  # a torch without the fused CPU kernel
        opt = torch.optim.AdamW(model.parameters(), foreach=True, **settings)
        fused = False

    def loss_and_backward():
        out = model(x, t, encoder_hidden_states=context).sample
        loss = torch.mean((out - target) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()

    def train_step():
        loss_and_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        loss_and_backward()
    flops = counter.get_total_flops()
    log(f"train: {a.warmup} warm-up + {a.train_iters} timed steps at batch {a.batch}")
    train_s = seconds_per_call(train_step, a.train_iters, a.warmup)
    print(json.dumps({
        "diffusers_train_images_per_s": a.batch / statistics.median(train_s),
        "diffusers_train_step_seconds": train_s,
        "diffusers_params": n_params,
        "diffusers_train_flops_per_image": flops / a.batch,
        "diffusers_adamw_fused": fused,
        "torch_matmul_peak_gflops": peak / 1e9,
        "torch_threads": torch.get_num_threads(),
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "diffusers_config": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
    }), flush=True)


if __name__ == "__main__":
    main()
