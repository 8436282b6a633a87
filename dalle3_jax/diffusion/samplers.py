"""Samplers (DDPM, DDIM, DPM-Solver++ 2M) with classifier-free guidance, jitted with static steps.

Every sampler here moves from timestep t_i to the next one s (the last target is the clean
image, alpha_bar = 1) by the same update, only with different coefficients:

    x_s = A x_t + B x0_hat + C eps_hat + P x0_hat_prev + S z,        z ~ N(0, I)

  ddim      A = 0, B = alpha_s, C = sqrt(1 - alpha_bar_s - S^2), S = eta * sigma_ddim (Song et al.
            2021); eta = 0 is the deterministic sampler, eta = 1 samples like DDPM.
  ddpm      the ancestral step from the posterior q(x_s | x_t, x0_hat): A and B its mean's
            coefficients, S its standard deviation (Ho et al. 2020; on a strided subset of
            timesteps when steps < T).
  dpmpp_2m  DPM-Solver++(2M) (Lu et al. 2022): A = sigma_s / sigma_t, and a second-order
            multistep combination of this step's x0_hat and the previous one's (first order at
            the first step, where the previous log-SNR is -inf under a zero-terminal-SNR
            schedule, and at the last, whose log-SNR is +inf).

The coefficients are computed once on the host in float64 (`coefficients`) and fed to one
`lax.scan`, so a step count is a static shape and every sampler with that step count shares one
compiled program; the guidance scale and eta are plain inputs (no recompilation). Timesteps are
"trailing" (t_0 = T - 1, evenly spaced down), so sampling starts from pure noise exactly where a
zero-terminal-SNR schedule ends.

Classifier-free guidance (Ho & Salimans 2022): out = out_uncond + g * (out_cond - out_uncond),
with both halves in one batched call of the network; g = 1 is the conditional model.

Dimension letters: B batch, H, W, C image, L text length, N sampler steps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dalle3_jax import sharding
from dalle3_jax.diffusion import losses
from dalle3_jax.diffusion.schedules import Schedule

SAMPLERS = ("ddim", "ddpm", "dpmpp_2m")
COEFFS = ("t", "alpha", "sigma", "A", "B", "C", "P", "S")


def timesteps(total: int, steps: int) -> np.ndarray:
    """N trailing timesteps, descending from T - 1: e.g. T=1000, N=4 -> [999, 749, 499, 249]."""
    if not 1 <= steps <= total:
        raise ValueError(f"steps must be in [1, {total}], got {steps}")
    return (np.round(np.arange(total, 0, -total / steps)).astype(np.int64) - 1)[:steps]


def coefficients(schedule: Schedule, sampler: str, steps: int, eta: float = 0.0) -> dict[str, np.ndarray]:
    """Per-step float32 coefficient tables [N] for `sampler` (see the module docstring)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    ts = timesteps(schedule.timesteps, steps)
    abar_t = schedule.alphas_cumprod[ts]
    abar_s = np.append(schedule.alphas_cumprod[ts[1:]], 1.0)  # the last step lands on the clean image
    a_t, s_t = np.sqrt(abar_t), np.sqrt(1.0 - abar_t)
    a_s, s_s = np.sqrt(abar_s), np.sqrt(1.0 - abar_s)
    zero = np.zeros(steps)
    A, B, C, P, S = zero.copy(), zero.copy(), zero.copy(), zero.copy(), zero.copy()
    if sampler == "ddim":
        S = eta * np.sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s))
        B, C = a_s, np.sqrt(np.maximum(1 - abar_s - S**2, 0.0))
    elif sampler == "ddpm":
        beta = 1 - abar_t / abar_s  # the one-step beta between t and s
        A = np.sqrt(abar_t / abar_s) * (1 - abar_s) / (1 - abar_t)
        B = a_s * beta / (1 - abar_t)
        S = np.sqrt((1 - abar_s) / (1 - abar_t) * beta)
    else:
        with np.errstate(divide="ignore"):
            lam_t, lam_s = np.log(a_t) - np.log(s_t), np.log(a_s) - np.log(s_s)
        h = lam_s - lam_t
        A = s_s / s_t
        d = a_s - a_t * s_s / s_t  # alpha_s (1 - exp(-h)), written without exp(+-inf)
        w = np.zeros(steps)
        for i in range(1, steps):
            if np.isfinite(h[i]) and np.isfinite(h[i - 1]):
                w[i] = h[i] / (2 * h[i - 1])  # 1 / (2 r), r = h_prev / h
        B, P = d * (1 + w), -d * w
    table = dict(t=ts, alpha=a_t, sigma=s_t, A=A, B=B, C=C, P=P, S=S)
    return {k: np.asarray(v, np.float32) for k, v in table.items()}


def sample_loop(denoise: Callable[[jax.Array, jax.Array], jax.Array], x_init: jax.Array, coeffs: dict,
                rng: jax.Array, *, prediction: str, clip_x0: bool = False) -> jax.Array:
    """Runs the sampler whose `coefficients` are given from x_init [B, ...] (noise at t_0).

    denoise(x, t) -> network output (after guidance), t float timesteps [B]. With clip_x0, x0_hat
    is clipped to [-1, 1] (the data range) and eps_hat recomputed from it. Traceable (jit it).
    """
    def step(carry, row):
        x, x0_prev, i = carry
        t = jnp.full((x.shape[0],), row["t"], jnp.float32)
        out = denoise(x, t).astype(jnp.float32)
        alpha, sigma = row["alpha"], row["sigma"]
        x0, eps = losses.to_x0_eps(out, x, alpha, sigma, prediction)
        if clip_x0:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = (x - alpha * x0) / sigma  # sigma_t > 0 at every sampled timestep
        z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
        x = row["A"] * x + row["B"] * x0 + row["C"] * eps + row["P"] * x0_prev + row["S"] * z
        return (x, x0, i + 1), None

    rows = {k: jnp.asarray(coeffs[k]) for k in COEFFS}
    init = (x_init.astype(jnp.float32), jnp.zeros_like(x_init, jnp.float32), jnp.zeros((), jnp.int32))
    (x, _, _), _ = jax.lax.scan(step, init, rows)
    return x


def guided(out_cond: jax.Array, out_uncond: jax.Array, scale) -> jax.Array:
    """Classifier-free guidance: uncond + scale * (cond - uncond)."""
    return out_uncond + scale * (out_cond - out_uncond)


@functools.partial(jax.jit, static_argnames=("graphdef", "prediction", "clip_x0", "shape", "use_guidance"))
def _generate(graphdef, state, tokens, null_tokens, rng, coeffs, guidance, *, prediction, clip_x0, shape,
              use_guidance):
    model = nnx.merge(graphdef, state)
    k_init, k_steps = jax.random.split(rng)
    b = tokens.shape[0]
    x_init = jax.random.normal(k_init, (b, *shape), jnp.float32)
    enc = model.encode_text(tokens)
    if use_guidance:
        null = model.encode_text(jnp.broadcast_to(null_tokens, tokens.shape))
        # Conditional and unconditional halves go through the UNet as one batch of 2B.
        both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), enc, null)

        def denoise(x, t):
            out = model.denoise(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
            return guided(out[:b], out[b:], guidance)
    else:
        def denoise(x, t):
            return model.denoise(x, t, enc)
    return sample_loop(denoise, x_init, coeffs, k_steps, prediction=prediction, clip_x0=clip_x0)


def generate(model: nnx.Module, tokens, rng: jax.Array, schedule: Schedule, *, null_tokens=None,
             sampler: str = "ddim", steps: int = 25, guidance: float | None = 3.0, eta: float = 0.0,
             prediction: str = "v", clip_x0: bool = True) -> jax.Array:
    """Images [B, H, W, C] in [-1, 1]-ish float32 from captions `tokens` [B, L].

    `model` has encode_text(tokens) and denoise(x, t, encoding) (models/t2i.py), image_size and
    channels. With `guidance` None the conditional model alone runs (half the work); otherwise
    null_tokens [1, L] (the tokenised empty caption) is the unconditional input. One compiled
    program per (model structure, batch, steps, guidance on/off); sampler, eta and the scale are
    data.
    """
    if guidance is not None and null_tokens is None:
        raise ValueError("classifier-free guidance needs null_tokens (the tokenised empty caption)")
    coeffs = coefficients(schedule, sampler, steps, eta)
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(tokens)
    null = jnp.asarray(null_tokens if null_tokens is not None else tokens[:1])
    return _generate(graphdef, state, tokens, null, rng, coeffs, jnp.float32(1.0 if guidance is None else guidance),
                     prediction=prediction, clip_x0=clip_x0, shape=(model.image_size, model.image_size, model.channels),
                     use_guidance=guidance is not None)


def to_uint8(images: jax.Array) -> np.ndarray:
    """Model-space images in [-1, 1] [B, H, W, C] -> uint8 [B, H, W, C] (clipped)."""
    x = np.asarray(sharding.to_host(images), np.float32)  # whole on every process
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
