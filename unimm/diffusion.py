"""Gaussian diffusion as Transfusion trains it: DDPM, cosine schedule, ε-prediction.

The model's output can also be v (Salimans & Ho 2022: v = √ᾱ·ε − √(1-ᾱ)·x₀),
a departure from the paper behind `model.prediction`: at the top timesteps,
where x_t is almost pure noise, an ε-model's x₀ estimate (x_t − √(1-ᾱ)ε)/√ᾱ
divides by √ᾱ ≈ 0.006 and is garbage, while v stays well posed. Samplers work
in ε; `to_epsilon` converts.

Discrete timesteps t ∈ {0, …, T-1} (T = 1000). The cosine schedule is Nichol &
Dhariwal's: ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T) + s)/(1 + s)·π/2), s = 0.008,
with β clipped at 0.999. Noising: x_t = √ᾱ_t·x₀ + √(1-ᾱ_t)·ε; the model predicts
ε; the loss is the mean squared error per image, averaged over real images.
Samplers (DDPM ancestral and DDIM) step from x_t to an earlier timestep given
the model's ε; classifier-free guidance mixes conditional and unconditional ε.
They clip the x₀ estimate to [-c, c] only where the latent space is bounded
(`x0_clip`): pixels in [-1, 1] yes, a KL-VAE's unbounded latents no, since
clipping those would cut off real latent values and bias every step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


def cosine_alphas_cumprod(num_timesteps: int = 1000, s: float = 0.008) -> np.ndarray:
  """ᾱ_t for t = 0..T-1 (float64)."""
  def f(t):
    return np.cos((t / num_timesteps + s) / (1 + s) * np.pi / 2) ** 2
  t = np.arange(num_timesteps + 1, dtype=np.float64)
  betas = np.minimum(1 - f(t[1:]) / f(t[:-1]), 0.999)
  return np.cumprod(1 - betas)


@dataclasses.dataclass(frozen=True)
class Schedule:
  alphas_cumprod: jnp.ndarray  # [T] float32

  @classmethod
  def cosine(cls, num_timesteps: int = 1000) -> "Schedule":
    return cls(jnp.asarray(cosine_alphas_cumprod(num_timesteps), jnp.float32))

  @property
  def num_timesteps(self) -> int:
    return int(self.alphas_cumprod.shape[0])


def sample_timesteps(rng, t_max):
  """t ~ U{0, …, t_max-1} per image; t_max [...] int (≥ 1 where the image is real)."""
  u = jax.random.uniform(rng, jnp.shape(t_max))
  return jnp.minimum(jnp.floor(u * jnp.maximum(t_max, 1)).astype(jnp.int32), jnp.maximum(t_max, 1) - 1)


def _bcast(values, x):
  return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


def add_noise(schedule: Schedule, x0, noise, t):
  """x_t for clean x0 [..., *latent], noise like x0, integer t [...]."""
  a = schedule.alphas_cumprod[t]
  return _bcast(jnp.sqrt(a), x0) * x0 + _bcast(jnp.sqrt(1 - a), x0) * noise


PREDICTIONS = ("epsilon", "v")


def check_prediction(prediction: str) -> str:
  if prediction not in PREDICTIONS:
    raise ValueError(f"diffusion prediction {prediction!r}; expected one of {PREDICTIONS}")
  return prediction


def target(schedule: Schedule, prediction: str, x0, noise, t):
  """What the model is trained to output for x_t = add_noise(x0, noise, t)."""
  if check_prediction(prediction) == "epsilon":
    return noise
  a = _bcast(schedule.alphas_cumprod[t], x0)
  return jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * x0


def to_epsilon(schedule: Schedule, prediction: str, output, x_t, t):
  """The ε implied by a model output at x_t, timestep t [...] (ε = √(1-ᾱ)·x_t + √ᾱ·v for v)."""
  if check_prediction(prediction) == "epsilon":
    return output
  a = _bcast(schedule.alphas_cumprod[t], x_t)
  return jnp.sqrt(1 - a) * x_t + jnp.sqrt(a) * output


def per_image_error(pred, target_value):
  """Each image's mean squared error: pred [B, M, ...] → [B, M] (float32)."""
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target_value.astype(jnp.float32)),
                  axis=tuple(range(2, target_value.ndim)))


def epsilon_loss(eps_pred, noise, valid):
  """Mean over real images of each image's mean squared ε error; valid [B, M]."""
  per_image = per_image_error(eps_pred, noise)
  valid = valid.astype(jnp.float32)
  return jnp.sum(per_image * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def predict_x0(schedule: Schedule, x_t, eps, t):
  a = _bcast(schedule.alphas_cumprod[t], x_t)
  return (x_t - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)


def x0_clip(setting: float, latents_bounded: bool) -> float | None:
  """The bound samplers clip x̂₀ to, from config `model.clip_x0`: -1 = auto (1.0 where the latents are
  bounded to [-1, 1], i.e. pixels; None for a KL-VAE's unbounded latents), 0 = off, c > 0 = [-c, c]."""
  setting = float(setting)
  if setting == -1:
    return 1.0 if latents_bounded else None
  if setting == 0:
    return None
  if setting > 0:
    return setting
  raise ValueError(f"model.clip_x0={setting}; expected -1 (auto), 0 (off) or c > 0 (clip x̂₀ to [-c, c])")


def ddim_step(schedule: Schedule, x_t, eps, t, t_prev, *, clip: float | None):
  """Deterministic DDIM (η = 0) from t to t_prev (t_prev = -1 means to x₀); clip: x̂₀'s bound or None."""
  x0 = predict_x0(schedule, x_t, eps, t)
  if clip is not None:
    x0 = jnp.clip(x0, -clip, clip)
    eps = (x_t - _bcast(jnp.sqrt(schedule.alphas_cumprod[t]), x_t) * x0) / _bcast(
        jnp.sqrt(1 - schedule.alphas_cumprod[t]), x_t)
  a_prev = jnp.where(t_prev >= 0, schedule.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)
  a_prev = _bcast(a_prev, x_t)
  return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev) * eps


def ddpm_step(schedule: Schedule, rng, x_t, eps, t, t_prev, *, clip: float | None):
  """Ancestral DDPM step from t to t_prev (posterior q(x_prev | x_t, x₀̂)), with skipped steps allowed;
  clip: x̂₀'s bound or None."""
  a_t = _bcast(schedule.alphas_cumprod[t], x_t)
  a_prev = _bcast(jnp.where(t_prev >= 0, schedule.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0), x_t)
  x0 = predict_x0(schedule, x_t, eps, t)
  if clip is not None:
    x0 = jnp.clip(x0, -clip, clip)
  beta = 1 - a_t / a_prev  # the effective β across the (possibly strided) step
  mean = (jnp.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (jnp.sqrt(a_t / a_prev) * (1 - a_prev) / (1 - a_t)) * x_t
  var = beta * (1 - a_prev) / (1 - a_t)
  noise = jax.random.normal(rng, x_t.shape, x_t.dtype)
  return mean + jnp.where(_bcast(t_prev >= 0, x_t), jnp.sqrt(var), 0.0) * noise


def timestep_sequence(num_timesteps: int, num_steps: int) -> np.ndarray:
  """Evenly spaced timesteps from T-1 down to 0 (num_steps of them)."""
  return np.linspace(num_timesteps - 1, 0, num_steps).round().astype(np.int32)


SAMPLERS = ("ddim", "ddpm")


def guide(eps_cond, eps_uncond, scale: float):
  """Classifier-free guidance: ε_u + s·(ε_c − ε_u)."""
  return eps_uncond + scale * (eps_cond - eps_uncond)


def sample(schedule: Schedule, eps_fn, x, *, num_steps: int, clip: float | None, guidance: float | None = 1.0,
           sampler: str = "ddim", rng=None):
  """Denoises x [N, ...] from pure noise, with classifier-free guidance unless `guidance` is None.

  `clip`: the bound on each step's x̂₀ (None: none), the task's `x0_clip` (no default: a latent
  space's range is the caller's to know).

  With guidance, `eps_fn(x2, t)` returns ε for the 2N rows [conditional;
  unconditional] at integer timestep t (the same x for both halves), mixed by
  `guide`; without, ε for the N conditional rows.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler {sampler!r}; expected one of {SAMPLERS}")
  steps = timestep_sequence(schedule.num_timesteps, num_steps)
  scale = jnp.float32(0.0 if guidance is None else guidance)
  for i, t in enumerate(steps):
    t_prev = int(steps[i + 1]) if i + 1 < len(steps) else -1
    eps = eps_fn(x if guidance is None else jnp.concatenate([x, x]), int(t))
    sub = None
    if sampler == "ddpm":
      rng, sub = jax.random.split(rng)
    x = _update(schedule.alphas_cumprod, x, eps, jnp.int32(t), jnp.int32(t_prev), scale, sub,
                sampler=sampler, clip=clip, guided=guidance is not None)
  return x


@functools.partial(jax.jit, static_argnames=("sampler", "clip", "guided"))
def _update(alphas_cumprod, x, eps, t, t_prev, scale, rng, *, sampler: str, clip: float | None, guided: bool):
  """One sampler step of `sample` as one compiled program: guidance (eps holds 2N rows when `guided`), then
  DDIM or DDPM from t to t_prev."""
  n = x.shape[0]
  if guided:
    eps = guide(eps[:n], eps[n:], scale)
  tn, tp = jnp.full((n,), t, jnp.int32), jnp.full((n,), t_prev, jnp.int32)
  schedule = Schedule(alphas_cumprod)
  if sampler == "ddim":
    return ddim_step(schedule, x, eps, tn, tp, clip=clip)
  return ddpm_step(schedule, rng, x, eps, tn, tp, clip=clip)
