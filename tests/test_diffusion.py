"""Diffusion schedule, noising, loss and samplers against float64 NumPy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm import diffusion


def numpy_cosine_alphas_cumprod(T=1000, s=0.008):
  """Nichol & Dhariwal's schedule, written out step by step in float64."""
  out, prod = [], 1.0
  f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
  for t in range(T):
    beta = min(1 - f(t + 1) / f(t), 0.999)
    prod *= 1 - beta
    out.append(prod)
  return np.array(out)


def test_cosine_schedule_matches_reference():
  want = numpy_cosine_alphas_cumprod()
  got = diffusion.cosine_alphas_cumprod(1000)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
  sched = diffusion.Schedule.cosine(1000)
  np.testing.assert_allclose(np.asarray(sched.alphas_cumprod), want, rtol=1e-6, atol=1e-9)
  assert want[0] > 0.9999 and want[-1] < 1e-4 and np.all(np.diff(want) < 0)


def test_noising_and_loss_match_reference():
  rng = np.random.default_rng(0)
  sched = diffusion.Schedule.cosine(1000)
  abar = numpy_cosine_alphas_cumprod()
  x0 = rng.normal(size=(2, 3, 4, 4, 2))
  noise = rng.normal(size=x0.shape)
  t = rng.integers(0, 1000, size=(2, 3))
  got = diffusion.add_noise(sched, jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32), jnp.asarray(t))
  want = np.sqrt(abar[t])[..., None, None, None] * x0 + np.sqrt(1 - abar[t])[..., None, None, None] * noise
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  pred = rng.normal(size=x0.shape)
  valid = np.array([[1, 1, 0], [1, 0, 0]], bool)
  per_image = ((pred - noise) ** 2).mean(axis=(2, 3, 4))
  want_loss = per_image[valid].mean()
  got_loss = diffusion.epsilon_loss(jnp.asarray(pred), jnp.asarray(noise), jnp.asarray(valid))
  np.testing.assert_allclose(float(got_loss), want_loss, rtol=1e-5)


def test_timesteps_respect_each_images_limit():
  t_max = jnp.array([[1000, 500, 0], [1, 1000, 500]] * 500)
  t = np.asarray(diffusion.sample_timesteps(jax.random.key(0), t_max))
  tm = np.asarray(t_max)
  assert np.all(t >= 0) and np.all(t < np.maximum(tm, 1))
  assert t[tm == 500].max() > 450 and t[tm == 1000].max() > 950  # covers the range


def test_samplers_with_the_true_noise_recover_x0():
  sched = diffusion.Schedule.cosine(1000)
  rng = np.random.default_rng(1)
  x0 = jnp.asarray(rng.uniform(-0.9, 0.9, size=(3, 4, 4, 1)), jnp.float32)
  eps = jnp.asarray(rng.normal(size=x0.shape), jnp.float32)
  t = jnp.array([999, 500, 10])
  xt = diffusion.add_noise(sched, x0, eps, t)
  out = diffusion.ddim_step(sched, xt, eps, t, jnp.array([-1, -1, -1]), clip=1.0)
  np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=2e-3)


def test_ddpm_step_is_the_posterior():
  """One unit step: mean and variance of q(x_{t-1} | x_t, x0) in float64."""
  sched = diffusion.Schedule.cosine(1000)
  abar = numpy_cosine_alphas_cumprod()
  rng = np.random.default_rng(2)
  x0 = rng.uniform(-0.5, 0.5, size=(1, 2, 2, 1))
  eps = rng.normal(size=x0.shape)
  t = 400
  xt = np.sqrt(abar[t]) * x0 + np.sqrt(1 - abar[t]) * eps
  beta = 1 - abar[t] / abar[t - 1]
  mean = np.sqrt(abar[t - 1]) * beta / (1 - abar[t]) * x0 + np.sqrt(1 - beta) * (1 - abar[t - 1]) / (1 - abar[t]) * xt
  var = beta * (1 - abar[t - 1]) / (1 - abar[t])
  key = jax.random.key(3)
  z = np.asarray(jax.random.normal(key, x0.shape, jnp.float32))
  got = diffusion.ddpm_step(sched, key, jnp.asarray(xt, jnp.float32), jnp.asarray(eps, jnp.float32),
                            jnp.array([t]), jnp.array([t - 1]), clip=1.0)
  np.testing.assert_allclose(np.asarray(got), mean + np.sqrt(var) * z, rtol=1e-4, atol=1e-4)


def test_guidance():
  c, u = jnp.array([1.0, 2.0]), jnp.array([0.5, 0.0])
  np.testing.assert_allclose(np.asarray(diffusion.guide(c, u, 3.0)), [2.0, 6.0])


def test_v_prediction_target_and_epsilon_match_reference():
  """v = √ᾱ·ε − √(1-ᾱ)·x₀ (float64 NumPy); to_epsilon inverts it at every t, incl. t = T-1."""
  rng = np.random.default_rng(1)
  sched = diffusion.Schedule.cosine(1000)
  abar = numpy_cosine_alphas_cumprod()
  x0 = rng.uniform(-1, 1, size=(3, 2, 4, 4, 3))
  noise = rng.normal(size=x0.shape)
  t = np.array([[0, 999], [500, 998], [1, 250]])
  a = abar[t][..., None, None, None]
  want_v = np.sqrt(a) * noise - np.sqrt(1 - a) * x0
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  got_v = diffusion.target(sched, "v", f32(x0), f32(noise), jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(got_v), want_v, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(diffusion.target(sched, "epsilon", f32(x0), f32(noise), t)), f32(noise))
  x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
  got_eps = diffusion.to_epsilon(sched, "v", f32(want_v), f32(x_t), jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(got_eps), noise, atol=1e-5)
  # At t = T-1 the x₀ an exact v implies is still exact (an ε-model's would divide by √ᾱ ≈ 0.006).
  x0_hat = diffusion.predict_x0(sched, f32(x_t), got_eps, jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(x0_hat)[0, 1], x0[0, 1], atol=2e-3)
  with pytest.raises(ValueError, match="expected one of"):
    diffusion.target(sched, "x0", f32(x0), f32(noise), t)


def numpy_step(abar, x_t, eps, t, t_prev, clip, z=None):
  """One DDIM (z None) or DDPM (noise z) step per row from t to t_prev in float64, x̂₀ clipped to
  [-clip, clip] (ε re-derived from it) unless clip is None."""
  shape = (-1,) + (1,) * (x_t.ndim - 1)
  a_t = abar[t].reshape(shape)
  a_prev = np.where(t_prev >= 0, abar[np.maximum(t_prev, 0)], 1.0).reshape(shape)
  x0 = (x_t - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
  if clip is not None:
    x0 = np.clip(x0, -clip, clip)
    eps = (x_t - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
  if z is None:
    return np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
  beta = 1 - a_t / a_prev
  mean = np.sqrt(a_prev) * beta / (1 - a_t) * x0 + np.sqrt(a_t / a_prev) * (1 - a_prev) / (1 - a_t) * x_t
  return mean + np.where((t_prev >= 0).reshape(shape), np.sqrt(beta * (1 - a_prev) / (1 - a_t)), 0.0) * z


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_x0_is_clipped_only_when_asked(sampler):
  """Steps and whole samples against float64 NumPy, with an x̂₀ far outside [-1, 1] (a KL-VAE latent's
  range): clip=None leaves it as it is, clip=c bounds it to [-c, c]."""
  sched = diffusion.Schedule.cosine(1000)
  abar = numpy_cosine_alphas_cumprod()
  rng = np.random.default_rng(4)
  x0 = rng.uniform(-3, 3, size=(3, 4, 4, 2))
  eps = rng.normal(size=x0.shape)
  t, t_prev = np.array([950, 500, 10]), np.array([800, 250, -1])
  x_t = np.sqrt(abar[t])[:, None, None, None] * x0 + np.sqrt(1 - abar[t])[:, None, None, None] * eps
  key = jax.random.key(7)
  z = np.asarray(jax.random.normal(key, x0.shape, jnp.float32), np.float64) if sampler == "ddpm" else None
  f32 = lambda v: jnp.asarray(v, jnp.float32)

  def step(clip):
    if sampler == "ddim":
      return diffusion.ddim_step(sched, f32(x_t), f32(eps), jnp.asarray(t), jnp.asarray(t_prev), clip=clip)
    return diffusion.ddpm_step(sched, key, f32(x_t), f32(eps), jnp.asarray(t), jnp.asarray(t_prev), clip=clip)
  for clip in (None, 1.0, 2.0):  # float32 x̂₀ = (x_t − √(1-ᾱ)·ε)/√ᾱ cancels at high t: 1e-3
    np.testing.assert_allclose(np.asarray(step(clip)), numpy_step(abar, x_t, eps, t, t_prev, clip, z),
                               rtol=1e-3, atol=1e-3)
  if sampler == "ddim":  # to x₀ (the last row) unclipped, the true ε gives back x₀ itself, beyond ±1
    np.testing.assert_allclose(np.asarray(step(None))[2], x0[2], atol=1e-3)
    assert np.abs(x0[2]).max() > 2

  # diffusion.sample hands its clip to every step: 3 steps with a fixed ε (x̂₀ ≈ 160 at t = 999).
  noise = rng.normal(size=(2, 4, 4, 2))
  fixed_eps = rng.normal(size=noise.shape)
  steps = diffusion.timestep_sequence(1000, 3)
  for clip in (None, 1.0):
    got = diffusion.sample(sched, lambda x, _: f32(fixed_eps), f32(noise), num_steps=3, clip=clip, guidance=None,
                           sampler=sampler, rng=key)
    want, sample_rng = noise, key
    for i, ti in enumerate(steps):
      tp = int(steps[i + 1]) if i + 1 < len(steps) else -1
      zi = None
      if sampler == "ddpm":
        sample_rng, sub = jax.random.split(sample_rng)
        zi = np.asarray(jax.random.normal(sub, noise.shape, jnp.float32), np.float64)
      want = numpy_step(abar, want, fixed_eps, np.full(2, ti), np.full(2, tp), clip, zi)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3, atol=1e-3)
    assert (np.abs(want).max() > 1) == (clip is None)
