"""Diffusion for the T2I stage: noise schedules, parameterisations and losses, samplers, EMA.

    schedules   linear / cosine alpha_bar tables, zero-terminal-SNR rescaling
    losses      eps / v prediction, the weighted denoising loss, caption dropout for guidance
    samplers    DDPM, DDIM (eta), DPM-Solver++(2M), classifier-free guidance, jitted generation
    ema         parameter moving average with a warm-up of its decay
"""

from dalle3_jax.diffusion import ema, losses, samplers, schedules

__all__ = ["ema", "losses", "samplers", "schedules"]
