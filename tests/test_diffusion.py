"""Schedules, parameterisations, loss weighting, samplers (against exact Gaussian denoisers), EMA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dalle3_jax.diffusion import ema, losses, samplers, schedules
from dalle3_jax.models import t2i

# Data x0 ~ N(MEAN, STD^2) per coordinate: then E[x0 | x_t] is known in closed form, so an
# exact "network" exists and a correct sampler must reproduce the data distribution.
MEAN, STD = np.array([0.5, -1.0], np.float32), np.array([0.3, 0.8], np.float32)


def exact_v(x, t, schedule):
    """The v prediction of the exact denoiser of the Gaussian data at timesteps t [B]."""
    alpha, sigma = schedule.alpha_sigma(t.astype(jnp.int32))
    a, s = alpha[:, None], sigma[:, None]
    x0 = MEAN + a * STD**2 / (a**2 * STD**2 + s**2) * (x - a * MEAN)
    eps = (x - a * x0) / s
    return a * eps - s * x0


def run(schedule, sampler, steps, x_init, rng, eta=0.0):
    coeffs = samplers.coefficients(schedule, sampler, steps, eta)
    fn = jax.jit(lambda x, r: samplers.sample_loop(lambda x, t: exact_v(x, t, schedule), x, coeffs, r,
                                                   prediction="v"))
    return np.asarray(fn(x_init, rng))


@pytest.fixture(scope="module")
def ztsnr():
    return schedules.make("cosine", 1000, zero_terminal_snr=True)


def test_schedules():
    lin = schedules.make("linear", 1000)
    cos = schedules.make("cosine", 1000)
    z = schedules.make("cosine", 1000, zero_terminal_snr=True)
    for s in (lin, cos, z):
        assert np.all(np.diff(s.alphas_cumprod) < 0)
    assert lin.alphas_cumprod[0] == pytest.approx(1 - 1e-4)
    assert z.alphas_cumprod[-1] == 0.0 and z.terminal_snr == 0.0 and cos.terminal_snr > 0
    assert z.alphas_cumprod[0] == pytest.approx(cos.alphas_cumprod[0], rel=1e-12)
    x0, noise = jnp.ones((2, 3)), jnp.full((2, 3), 2.0)
    assert np.allclose(z.add_noise(x0, noise, jnp.array([999, 0]))[0], 2.0)  # pure noise at the end
    with pytest.raises(ValueError, match="Unknown schedule"):
        schedules.make("sigmoid")


def test_parameterisations_round_trip():
    kx, kn = jax.random.split(jax.random.key(0))
    x0, noise = jax.random.normal(kx, (4, 5)), jax.random.normal(kn, (4, 5))
    alpha = jnp.array([0.0, 0.3, 0.8, 0.999])[:, None]
    sigma = jnp.sqrt(1 - alpha**2)
    x_t = alpha * x0 + sigma * noise
    v = losses.target(x0, noise, alpha[:, 0], sigma[:, 0], "v")
    got_x0, got_eps = losses.to_x0_eps(v, x_t, alpha, sigma, "v")
    np.testing.assert_allclose(got_x0, x0, atol=1e-5)
    np.testing.assert_allclose(got_eps, noise, atol=1e-5)
    x0_e, _ = losses.to_x0_eps(noise[1:], x_t[1:], alpha[1:], sigma[1:], "eps")
    np.testing.assert_allclose(x0_e, x0[1:], atol=1e-4)


def test_loss_weighting():
    snr = jnp.array([0.0, 1.0, 5.0, 100.0])
    w = np.asarray(losses.loss_weight(snr, "v", "min_snr_plus_one", 5.0))
    np.testing.assert_allclose(w, [1.0, 1.0, 1.0, 6.0 / 101.0], rtol=1e-6)
    # Plain min-SNR under v prediction gives pure noise no weight at all (what left place at chance).
    assert float(losses.loss_weight(snr, "v", "min_snr")[0]) == 0.0
    np.testing.assert_allclose(losses.loss_weight(snr[1:], "eps", "min_snr"), [1.0, 1.0, 0.05], rtol=1e-6)
    with pytest.raises(ValueError, match="eps prediction cannot"):
        losses.check("eps", "min_snr", schedules.make("cosine", 100, zero_terminal_snr=True))
    with pytest.raises(ValueError, match="min_snr_plus_one"):
        losses.check("eps", "min_snr_plus_one")


def test_caption_dropout_rate():
    tokens = jnp.tile(jnp.arange(1, 9)[None], (4000, 1))
    null = jnp.array([[1, 2, 0, 0, 0, 0, 0, 0]])
    out = np.asarray(losses.drop_captions(tokens, null, 0.1, jax.random.key(0)))
    dropped = np.all(out == np.asarray(null), axis=1)
    kept = np.all(out == np.asarray(tokens), axis=1)
    assert np.all(dropped | kept) and abs(dropped.mean() - 0.1) < 0.02


def test_high_noise_timestep_sampling():
    uniform = np.asarray(losses.sample_timesteps(jax.random.key(0), 20000, 1000))
    assert uniform.min() >= 0 and uniform.max() <= 999 and abs((uniform >= 800).mean() - 0.2) < 0.015
    mixed = np.asarray(losses.sample_timesteps(jax.random.key(0), 20000, 1000, 0.5, 800))
    # Half the examples from 800..999, the other half uniform: 0.5 + 0.5 * 0.2 at or above 800.
    assert mixed.min() >= 0 and mixed.max() <= 999 and abs((mixed >= 800).mean() - 0.6) < 0.015
    assert abs((mixed < 400).mean() - 0.2) < 0.015  # the uniform half still covers low noise
    for bad in (dict(high_noise_prob=1.5), dict(high_noise_start=1000)):
        with pytest.raises(ValueError, match="high_noise"):
            losses.sample_timesteps(jax.random.key(0), 4, 1000, **{"high_noise_prob": 0.5, **bad})


def test_timesteps_are_trailing():
    assert samplers.timesteps(1000, 4).tolist() == [999, 749, 499, 249]
    assert samplers.timesteps(10, 10).tolist() == list(range(9, -1, -1))
    with pytest.raises(ValueError):
        samplers.timesteps(10, 11)


def test_ddim_eta1_and_ddpm_agree_with_the_data_distribution(ztsnr):
    n = 4000
    x_init = jax.random.normal(jax.random.key(1), (n, 2))
    got = {"ddpm": run(ztsnr, "ddpm", 100, x_init, jax.random.key(2)),
           "ddim": run(ztsnr, "ddim", 100, x_init, jax.random.key(7), eta=1.0),
           "ddim_det": run(ztsnr, "ddim", 100, x_init, jax.random.key(2), eta=0.0)}
    for name, x in got.items():
        # Standard error of the mean ~ 0.8 / sqrt(4000) = 0.013; of the std ~ 0.009 (plus a
        # small bias of 100 steps: the stochastic samplers' std comes out ~0.01-0.02 low).
        np.testing.assert_allclose(x.mean(0), MEAN, atol=0.05, err_msg=name)
        np.testing.assert_allclose(x.std(0), STD, atol=0.05, err_msg=name)
    # DDPM and DDIM(eta=1) with other noise: other samples, the same distribution.
    assert np.abs(got["ddpm"] - got["ddim"]).mean() > 0.1
    quantiles = np.linspace(0.05, 0.95, 19)
    np.testing.assert_allclose(np.quantile(got["ddpm"], quantiles, axis=0),
                               np.quantile(got["ddim"], quantiles, axis=0), atol=0.08)
    # With the same noise the two derivations (posterior mean + std, DDIM's eta=1 update) give
    # the same numbers: the coefficients are equal, not just the distributions.
    same_noise = run(ztsnr, "ddim", 100, x_init, jax.random.key(2), eta=1.0)
    np.testing.assert_allclose(same_noise, got["ddpm"], atol=1e-4)


def test_dpm_solver_converges_to_the_ddim_ode_solution(ztsnr):
    x_init = jax.random.normal(jax.random.key(3), (256, 2))
    rng = jax.random.key(4)
    reference = run(ztsnr, "ddim", 1000, x_init, rng)
    dpm = run(ztsnr, "dpmpp_2m", 50, x_init, rng)
    assert np.abs(dpm - reference).max() < 0.02
    # Second order: at 25 steps it is far closer to the ODE solution than first-order DDIM
    # (measured: mean error 0.002 against 0.028).
    err_dpm = np.abs(run(ztsnr, "dpmpp_2m", 25, x_init, rng) - reference).mean()
    err_ddim = np.abs(run(ztsnr, "ddim", 25, x_init, rng) - reference).mean()
    assert err_dpm < 0.2 * err_ddim, (err_dpm, err_ddim)


def test_guidance_scale_one_is_the_conditional_model():
    model = t2i.create(t2i.config("tiny"), rngs=nnx.Rngs(0))
    kernel = model.unet.conv_out.kernel  # zero at init: give the prediction something to say
    kernel.set_value(0.05 * jax.random.normal(jax.random.key(5), kernel.get_value().shape))
    schedule = schedules.make("cosine", 1000, zero_terminal_snr=True)
    tokens = jnp.array([[1, 40, 41, 2, 0, 0], [1, 77, 2, 0, 0, 0]])
    null = jnp.array([[1, 2, 0, 0, 0, 0]])
    kw = dict(null_tokens=null, steps=3, sampler="ddim")
    rng = jax.random.key(6)
    cond = samplers.generate(model, tokens, rng, schedule, guidance=None, **kw)
    one = samplers.generate(model, tokens, rng, schedule, guidance=1.0, **kw)
    three = samplers.generate(model, tokens, rng, schedule, guidance=3.0, **kw)
    np.testing.assert_allclose(one, cond, atol=1e-5)
    assert float(jnp.abs(three - cond).max()) > 1e-3
    with pytest.raises(ValueError, match="null_tokens"):
        samplers.generate(model, tokens, rng, schedule, guidance=3.0, steps=3)
    with pytest.raises(ValueError, match="Unknown sampler"):
        samplers.coefficients(schedule, "euler", 3)


def test_ema_warmup_and_update():
    assert float(ema.decay_at(1, 0.999)) == pytest.approx(2 / 11)
    assert float(ema.decay_at(10_000, 0.999)) == pytest.approx(0.999)
    assert float(ema.decay_at(1, 0.9, warmup=False)) == pytest.approx(0.9)
    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    avg = ema.EMA(model, decay=0.5, warmup=False)
    before = np.asarray(avg.model.kernel[...])
    model.kernel.set_value(model.kernel[...] + 1.0)
    avg.update(model, 1)
    np.testing.assert_allclose(avg.model.kernel[...], before + 0.5, atol=1e-6)
    with pytest.raises(ValueError, match="decay"):
        ema.EMA(model, decay=1.0)
