"""The report's figures (matplotlib, written as PNG): the paper's CLIP-score panels, prompt
following over training, the blend ablation, and side-by-side sample grids."""

from __future__ import annotations

import textwrap

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

Curves = dict[str, list[tuple[int, dict]]]  # model name -> [(step, metrics)] sorted by step


def _curve(ax, curves: Curves, key: str, title: str, ylabel: str) -> None:
    for name, points in curves.items():
        xs = [s for s, m in points if key in m]
        ys = [m[key] for s, m in points if key in m]
        if xs:
            ax.plot(xs, ys, marker="o", label=name)
    ax.set_title(title)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def clip_score_panels(curves: Curves, path: str) -> str:
    """CLIP score versus training step per caption type: ground-truth short prompts (left) and
    descriptive prompts (right), the two panels of the paper's figure."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    _curve(axes[0], curves, "clip_score_gt", "ground-truth short prompts", "CLIP score")
    _curve(axes[1], curves, "clip_score_descriptive", "descriptive prompts", "CLIP score")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def prompt_following_panels(curves: Curves, path: str) -> str:
    """Mean per-fact accuracy and all-facts-correct on descriptive prompts versus training step."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    _curve(axes[0], curves, "mean_fact_accuracy", "mean per-fact accuracy (descriptive prompts)", "accuracy")
    _curve(axes[1], curves, "all_facts_correct", "all facts correct (descriptive prompts)", "fraction of images")
    for ax in axes:
        ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def blend_ablation(points: list[tuple[float, dict]], path: str) -> str:
    """Final-checkpoint figures versus the share of DSC captions (0 = the alt-only model)."""
    points = sorted(points, key=lambda p: p[0])
    xs = [100 * b for b, _ in points]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("clip_score_descriptive", "descriptive prompts"), ("clip_score_gt", "short prompts")):
        axes[0].plot(xs, [m.get(key, np.nan) for _, m in points], marker="o", label=label)
    axes[0].set_ylabel("CLIP score")
    for key in ("mean_fact_accuracy", "all_facts_correct"):
        axes[1].plot(xs, [m.get(key, np.nan) for _, m in points], marker="o", label=key)
    axes[1].set_ylabel("descriptive prompts")
    axes[1].set_ylim(0, 1)
    for ax in axes:
        ax.set_xlabel("% of training captions that are DSC (rest alt text)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("caption blend ablation (final checkpoints)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def side_by_side(images: dict[str, np.ndarray], prompts: list[str], path: str, wrap: int = 40) -> str:
    """One row per prompt, one column per model: images[name] is uint8 [len(prompts), H, W, 3]."""
    names = list(images)
    rows, cols = len(prompts), len(names)
    fig, axes = plt.subplots(rows, cols + 1, figsize=(1.6 * cols + 3.2, 1.6 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [2.2] + [1] * cols})
    for r, prompt in enumerate(prompts):
        lines = textwrap.wrap(prompt, wrap, max_lines=4, placeholder=" ...")
        axes[r, 0].text(0, 0.5, "\n".join(lines), fontsize=6, va="center")
        axes[r, 0].axis("off")
        for c, name in enumerate(names):
            ax = axes[r, c + 1]
            ax.imshow(images[name][r], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
