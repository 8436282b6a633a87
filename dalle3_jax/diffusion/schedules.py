"""Noise schedules: the cumulative signal level alpha_bar_t over T discrete timesteps.

Forward process: x_t = alpha_t * x_0 + sigma_t * eps with alpha_t = sqrt(alpha_bar_t),
sigma_t = sqrt(1 - alpha_bar_t), eps ~ N(0, I), t = 0 .. T-1 (t = 0 is the least noisy).
Signal-to-noise ratio SNR_t = alpha_t^2 / sigma_t^2.

Schedules:
  linear   betas from beta_start to beta_end (DDPM, Ho et al. 2020)
  cosine   alpha_bar_t = f(t) / f(0), f(t) = cos^2(pi/2 * (t/T + s) / (1 + s)), betas clipped at
           0.999 (improved DDPM, Nichol & Dhariwal 2021)
  zero_terminal_snr (an option on either): alpha_bar rescaled so that the last timestep is pure
           noise (alpha_T = 0) while the first is unchanged (Lin et al. 2024, "Common diffusion
           noise schedules and sample steps are flawed"). Without it the model never sees pure
           noise in training yet starts sampling from it; on the shapes world this left a tint on
           backgrounds and made the image's layout (where the object sits, decided at the highest
           noise) hard to learn. It needs v prediction: epsilon carries no information at SNR 0.

Schedules are host-side numpy (float64) tables; `alpha_sigma(t)` gathers float32 values inside
jitted code, so a schedule never becomes a traced input.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections
import numpy as np

KINDS = ("linear", "cosine")


def default_config() -> ml_collections.ConfigDict:
    """The `diffusion.schedule`-related fields of a T2I config."""
    c = ml_collections.ConfigDict()
    c.schedule = "cosine"  # linear | cosine
    c.timesteps = 1000  # T, discrete training timesteps
    c.zero_terminal_snr = True  # rescale so alpha_bar at t = T-1 is exactly 0 (needs v prediction)
    c.beta_start = 1e-4  # linear schedule: first beta
    c.beta_end = 0.02  # linear schedule: last beta
    c.cosine_s = 0.008  # cosine schedule: small offset so beta_0 is not vanishingly small
    return c


def linear_alphas_cumprod(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """alpha_bar [T] of DDPM's linear beta schedule."""
    betas = np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def cosine_alphas_cumprod(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """alpha_bar [T] of the cosine schedule, with betas clipped at `max_beta` (as in its paper)."""
    f = lambda u: np.cos((u / timesteps + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    steps = np.arange(timesteps + 1, dtype=np.float64)
    betas = np.clip(1.0 - f(steps[1:]) / f(steps[:-1]), 0.0, max_beta)
    return np.cumprod(1.0 - betas)


def rescale_zero_terminal_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Shifts and scales sqrt(alpha_bar) so its last value is 0 and its first is unchanged."""
    root = np.sqrt(alphas_cumprod)
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    return root**2


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """alpha_bar_t for t = 0 .. T-1 (float64 numpy, decreasing)."""

    alphas_cumprod: np.ndarray

    def __post_init__(self):
        a = np.asarray(self.alphas_cumprod, np.float64)
        if a.ndim != 1 or len(a) < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D table of >= 2 timesteps, got shape {a.shape}")
        if not (np.all(a >= 0) and np.all(a < 1) and np.all(np.diff(a) <= 0)):
            raise ValueError("alphas_cumprod must lie in [0, 1) and never increase")
        object.__setattr__(self, "alphas_cumprod", a)

    @property
    def timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def terminal_snr(self) -> float:
        return float(self.snr_np(self.timesteps - 1))

    def snr_np(self, t) -> np.ndarray:
        """SNR at integer timesteps t (host side)."""
        a = self.alphas_cumprod[np.asarray(t)]
        return a / (1.0 - a)

    def alpha_sigma(self, t) -> tuple:
        """(alpha_t, sigma_t), float32 jnp arrays shaped like the integer timesteps t."""
        table = jnp.asarray(self.alphas_cumprod, jnp.float32)
        a = jnp.take(table, jnp.asarray(t, jnp.int32))
        return jnp.sqrt(a), jnp.sqrt(1.0 - a)

    def snr(self, t):
        """SNR_t (float32 jnp), 0 where the schedule has zero terminal SNR."""
        alpha, sigma = self.alpha_sigma(t)
        return jnp.square(alpha) / jnp.square(sigma)

    def add_noise(self, x0, noise, t):
        """x_t = alpha_t x0 + sigma_t noise for x0, noise [B, ...] and t [B]."""
        alpha, sigma = self.alpha_sigma(t)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        return alpha.reshape(shape) * x0 + sigma.reshape(shape) * noise


def make(kind: str = "cosine", timesteps: int = 1000, *, zero_terminal_snr: bool = False, beta_start: float = 1e-4,
         beta_end: float = 0.02, cosine_s: float = 0.008) -> Schedule:
    """A Schedule of `kind` (linear | cosine), optionally rescaled to zero terminal SNR."""
    if timesteps < 2:
        raise ValueError(f"timesteps must be >= 2, got {timesteps}")
    if kind == "linear":
        table = linear_alphas_cumprod(timesteps, beta_start, beta_end)
    elif kind == "cosine":
        table = cosine_alphas_cumprod(timesteps, cosine_s)
    else:
        raise ValueError(f"Unknown schedule {kind!r}; expected one of {KINDS}")
    if zero_terminal_snr:
        table = rescale_zero_terminal_snr(table)
    return Schedule(table)


def from_config(c: ml_collections.ConfigDict) -> Schedule:
    """The schedule of a config block with default_config()'s fields."""
    return make(c.schedule, int(c.timesteps), zero_terminal_snr=bool(c.zero_terminal_snr),
                beta_start=float(c.beta_start), beta_end=float(c.beta_end), cosine_s=float(c.cosine_s))
