"""Rectified flow (`unimm.flow`) against float64 NumPy: the interpolation and its velocity target, the time
samplings and shift, and the Euler / Heun samplers with guidance on a flow whose exact solution is known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm import diffusion, flow


def test_interpolation_target_and_loss_match_numpy():
  rng = np.random.default_rng(0)
  x0, noise = rng.normal(size=(2, 3, 4, 4, 2)), rng.normal(size=(2, 3, 4, 4, 2))
  t = rng.uniform(size=(2, 3))
  x_t = flow.interpolate(jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32), jnp.asarray(t))
  want = (1 - t)[..., None, None, None] * x0 + t[..., None, None, None] * noise
  np.testing.assert_allclose(np.asarray(x_t), want, rtol=1e-5, atol=1e-6)
  v = flow.velocity(jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32))
  np.testing.assert_allclose(np.asarray(v), noise - x0, rtol=1e-5, atol=1e-6)
  pred = rng.normal(size=x0.shape)
  err = diffusion.per_image_error(jnp.asarray(pred, jnp.float32), v)
  np.testing.assert_allclose(np.asarray(err), ((pred - (noise - x0)) ** 2).reshape(2, 3, -1).mean(-1), rtol=1e-5)
  # The path's derivative is the target: (x_{t+h} − x_t) / h = v exactly for a straight line.
  h = 1e-2
  step = flow.interpolate(x0, noise, t + h) - flow.interpolate(x0, noise, t)
  np.testing.assert_allclose(np.asarray(step) / h, noise - x0, rtol=1e-3, atol=1e-3)


def test_time_samplings_and_the_shift():
  rng = jax.random.key(0)
  limit = jnp.concatenate([jnp.ones(20000), jnp.full(20000, 0.5)])
  t = np.asarray(flow.sample_times(rng, limit))
  assert (t[:20000] <= 1).all() and (t[20000:] <= 0.5).all() and (t >= 0).all()
  assert abs(t[:20000].mean() - 0.5) < 0.01 and abs(t[20000:].mean() - 0.25) < 0.01
  # logit-normal: σ(m + s·z) with the same normal draws z (float64 reference)
  z = np.asarray(jax.random.normal(rng, (1000,)), np.float64)
  got = np.asarray(flow.sample_times(rng, jnp.ones(1000), sampling="logit_normal", mean=0.5, std=0.8))
  np.testing.assert_allclose(got, 1 / (1 + np.exp(-(0.5 + 0.8 * z))), rtol=1e-5)
  # the shift keeps 0 and 1, moves the middle towards noise, and is what the sampler's grid uses
  ts = np.array([0.0, 0.25, 0.5, 1.0])
  np.testing.assert_allclose(flow.shift_time(ts, 3.0), 3 * ts / (1 + 2 * ts))
  shifted = np.asarray(flow.sample_times(rng, jnp.ones(20000), shift=3.0))
  assert abs(np.median(shifted) - 0.75) < 0.01  # the median 0.5 ↦ 1.5 / 2
  np.testing.assert_allclose(flow.time_grid(4, 3.0), flow.shift_time(np.linspace(1, 0, 5), 3.0))
  # read_shift: written images (limit 1) take `shift`, read ones (limit < 1, captioning) their own
  base = np.asarray(flow.sample_times(rng, limit), np.float64) / np.asarray(limit)
  both = np.asarray(flow.sample_times(rng, limit, shift=3.0, read_shift=1.0))
  np.testing.assert_allclose(both[:20000], 3 * base[:20000] / (1 + 2 * base[:20000]), rtol=1e-5)
  np.testing.assert_allclose(both[20000:], 0.5 * base[20000:], rtol=1e-5)
  with pytest.raises(ValueError, match="logit_normal"):
    flow.sample_times(rng, limit, sampling="beta")


def gaussian_velocity(mu: float, sigma: float):
  """E[ε − x₀ | x_t] for data N(μ, σ²): x_t is Gaussian with mean (1−t)μ and variance (1−t)²σ² + t², so the
  ODE from t = 1 carries noise z to μ + σ·z exactly (a curved flow: Euler and Heun differ in their error)."""
  def v(x, t):
    var = (1 - t) ** 2 * sigma ** 2 + t ** 2
    return -mu + (t - (1 - t) * sigma ** 2) / var * (x - (1 - t) * mu)
  return v


def numpy_sample(v, x, times, sampler):
  for t, t_next in zip(times[:-1], times[1:]):
    d = v(x, t)
    x_euler = x + (t_next - t) * d
    x = x + (t_next - t) * 0.5 * (d + v(x_euler, t_next)) if sampler == "heun" and t_next > 0 else x_euler
  return x


@pytest.mark.parametrize("sampler", flow.SAMPLERS)
def test_samplers_match_numpy_and_converge_to_the_exact_flow(sampler):
  mu, sigma = 1.5, 0.3
  v = gaussian_velocity(mu, sigma)
  z = np.random.default_rng(1).normal(size=(8, 2, 2, 1))
  exact = mu + sigma * z
  errors = []
  for steps in (4, 8, 16):
    got = flow.sample(lambda x, t: v(x, t), jnp.asarray(z, jnp.float32), num_steps=steps, sampler=sampler,
                      guidance=None, shift=2.0)
    want = numpy_sample(v, z, flow.time_grid(steps, 2.0), sampler)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    errors.append(np.abs(want - exact).max())
  assert errors[0] > errors[1] > errors[2]
  order = np.log2(errors[1] / errors[2])  # halving the step: Euler's error halves, Heun's falls faster
  assert (0.6 < order < 1.5) if sampler == "euler" else (order > 1.5), (sampler, errors)


def test_a_straight_flow_is_recovered_exactly_and_guidance_mixes_velocities():
  rng = np.random.default_rng(2)
  x0, z = rng.normal(size=(4, 2, 2, 3)), rng.normal(size=(4, 2, 2, 3))
  straight = lambda x, t: (x - x0) / t  # the velocity of the line from x₀ to where x is at time t
  for sampler in flow.SAMPLERS:
    got = flow.sample(straight, jnp.asarray(z, jnp.float32), num_steps=3, sampler=sampler, guidance=None)
    np.testing.assert_allclose(np.asarray(got), x0, rtol=1e-4, atol=1e-4)
  # guidance: [cond; uncond] rows, mixed as v_u + s·(v_c − v_u); a constant field moves x by the mix
  calls = []

  def both(x2, t):
    calls.append(x2.shape[0])
    return jnp.concatenate([jnp.full_like(x2[:4], 2.0), jnp.full_like(x2[4:], 1.0)])

  out = flow.sample(both, jnp.zeros((4, 2, 2, 3)), num_steps=5, guidance=3.0)
  np.testing.assert_allclose(np.asarray(out), -(1.0 + 3.0 * (2.0 - 1.0)), rtol=1e-6)  # Δt = −1 in total
  assert calls == [8] * 5


class RecordingModel:
  """Stands in for TransfusionModel in `TransfusionTask.loss_terms`: records what the image slots read and
  returns a fixed image output, so the loss can be checked against float64 NumPy."""

  def __init__(self, out):
    self.out, self.seen = out, {}

  def apply(self, variables, rows, noisy, time, return_hidden=False, rngs=None):
    self.seen = {"noisy": np.asarray(noisy, np.float64), "time": np.asarray(time, np.float64)}
    return jnp.zeros((*rows.tokens.shape, 8)), self.out


def flow_task(**kwargs):
  from unimm.models import autoencoders, transfusion  # pylint: disable=g-import-not-at-top
  return transfusion.TransfusionTask(None, autoencoders.AutoencoderConfig(), diffusion.Schedule.cosine(),
                                     image_shape=(4, 4, 1), objective="flow", **kwargs)


def test_the_flow_objective_in_the_transfusion_loss_matches_numpy():
  rng = np.random.default_rng(3)
  b, m = 2, 3
  images = rng.integers(0, 256, (b, m, 4, 4, 1), dtype=np.uint8)
  t_max = np.array([[1000, 500, 0], [1000, 1000, 500]], np.int32)  # 500: the captioning cap; 0: padding
  valid = t_max > 0
  out = jnp.asarray(rng.normal(size=(b, m, 4, 4, 1)), jnp.float32)
  batch = {"images": jnp.asarray(images), "image_t_max": jnp.asarray(t_max), "image_valid": jnp.asarray(valid),
           "tokens": jnp.ones((b, 6), jnp.int32), "positions": jnp.zeros((b, 6), jnp.int32),
           "segment_ids": jnp.ones((b, 6), jnp.int32), "image_ids": jnp.zeros((b, 6), jnp.int32),
           "loss_weights": jnp.ones((b, 6), jnp.float32)}
  for times in (flow.TimeSampling(), flow.TimeSampling("logit_normal", shift=3.0, mean=0.5, std=0.7)):
    task = flow_task(flow_times=times)
    task.model = RecordingModel(out)
    key = jax.random.key(11)
    sums = task.loss_terms(None, batch, key)
    # the reference: the same draws (the task's key split), then the formulas in float64
    rng_t, rng_noise, _, _ = jax.random.split(key, 4)
    noise = np.asarray(jax.random.normal(rng_noise, (b, m, 4, 4, 1)), np.float64)
    if times.sampling == "uniform":
      u = np.asarray(jax.random.uniform(rng_t, (b, m)), np.float64)
    else:
      u = 1 / (1 + np.exp(-(0.5 + 0.7 * np.asarray(jax.random.normal(rng_t, (b, m)), np.float64))))
    u = times.shift * u / (1 + (times.shift - 1) * u)
    t = u * t_max / 1000.0
    x0 = images.astype(np.float64) / 127.5 - 1
    x_t = (1 - t)[..., None, None, None] * x0 + t[..., None, None, None] * noise
    np.testing.assert_allclose(task.model.seen["noisy"], x_t, atol=1e-5)
    np.testing.assert_allclose(task.model.seen["time"], t * 1000, rtol=1e-5, atol=1e-3)
    assert (t[t_max == 500] <= 0.5).all() and (t[t_max == 1000] > 0).all()
    per_image = ((np.asarray(out, np.float64) - (noise - x0)) ** 2).reshape(b, m, -1).mean(-1)
    np.testing.assert_allclose(float(sums["diffusion"]), (per_image * valid).sum(), rtol=1e-5)
    # x0 prediction: the head's output is x̂₀; the loss is the velocity loss of v̂ = (x_t − x̂₀) / max(t, 0.05)
    task = flow_task(flow_times=times, prediction="x0")
    task.model = RecordingModel(out)
    sums = task.loss_terms(None, batch, key)
    clamped = np.maximum(t, flow.X0_MIN_T)[..., None, None, None]
    v_hat, v_true = (x_t - np.asarray(out, np.float64)) / clamped, (x_t - x0) / clamped  # = ε − x₀ for t ≥ 0.05
    per_image = ((v_hat - v_true) ** 2).reshape(b, m, -1).mean(-1)
    np.testing.assert_allclose(float(sums["diffusion"]), (per_image * valid).sum(), rtol=1e-4)
    big = t >= flow.X0_MIN_T
    np.testing.assert_allclose(v_true[big], (noise - x0)[big], atol=1e-9)
    # … i.e. ‖x̂₀ − x₀‖² / max(t, 0.05)²: a perfect x̂₀ has no loss at any t
    task.model = RecordingModel(jnp.asarray(x0, jnp.float32))
    assert abs(float(task.loss_terms(None, batch, key)["diffusion"])) < 1e-6


def test_x0_prediction_samples_through_its_velocity():
  """Sampling an x̂₀ head: v̂ = (x_t − clip(x̂₀)) / max(t, 0.05); an oracle x̂₀ = x₀ lands on x₀ exactly."""
  task = flow_task(prediction="x0")
  x_t = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 1)), jnp.float32)
  x0_hat = jnp.full((2, 4, 4, 1), 1.7, jnp.float32)
  got = task.sampler_input(x0_hat, x_t, jnp.array([500.0, 10.0]))  # t = 0.5 and 0.01 (floored at 0.05)
  want = (np.asarray(x_t) - 1.0) / np.array([0.5, 0.05])[:, None, None, None]  # pixels: x̂₀ clipped to 1
  np.testing.assert_allclose(got, want, rtol=1e-5)
  target = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 4, 4, 1)), jnp.float32)
  x = task.sample_latents(lambda x, time: task.sampler_input(target, x, time), jnp.ones((2, 4, 4, 1)), None,
                          num_steps=8, guidance=None, sampler="euler")
  np.testing.assert_allclose(x, target, atol=1e-5)


def test_flow_settings_are_checked():
  task = flow_task()
  assert task.sampler(None) == "euler" and task.sampler("heun") == "heun"
  with pytest.raises(ValueError, match="ddim.*does not sample objective='flow'"):
    task.sampler("ddim")
  with pytest.raises(ValueError, match="prediction='v' with objective=flow"):
    flow_task(prediction="v")
  with pytest.raises(ValueError, match="model.objective='rf'"):
    flow_task().__class__(None, None, None, objective="rf")
  with pytest.raises(ValueError, match="model.flow.shift=0"):
    flow.TimeSampling(shift=0.0)
