"""Rectified flow (flow matching), the objective beside DDPM (`unimm.diffusion`): the math, on any array.

Convention (SD3's, Esser et al. 2024): time runs from data to noise, t ∈ [0, 1],

    x_t = (1 − t)·x₀ + t·ε,        v = dx_t/dt = ε − x₀,

the model predicts v from (x_t, t), and the loss is the mean squared error of v per image
(`diffusion.per_image_error`), averaged over real images as for ε. Sampling integrates dx/dt = v̂ from t = 1 (pure
noise) down to t = 0 with Euler or Heun (second order: a trapezoidal correction with a second
evaluation; the last step, to t = 0, stays Euler, as in Karras et al. 2022), classifier-free guidance
mixing v̂ like ε: v_u + s·(v_c − v_u). Training times: `uniform` U(0, 1), `logit_normal` σ(N(m, s²)) (SD3:
m = 0, s = 1, more weight mid-way), each optionally `shift`ed for resolution, t ↦ α·t / (1 + (α − 1)·t)
(α > 1 spends more time at high noise, what larger images need); sampling uses the same shift on its
time grid. A captioning example's image stays readable by capping its t at `t_limit` (the DDPM path's
`noise_limit_t / max_timestep`, 0.5 by default).

`model.objective=flow` selects it for Transfusion (`TransfusionTask`): the model reads float time
t·T (T = `model.num_timesteps`, so the timestep embedding sees DDPM's range) and its patch head outputs v
(`model.prediction=epsilon`, the default), or the clean x̂₀ (`model.prediction=x0`; Li & He 2025, "Back to
Basics: Let Denoising Generative Models Denoise"): the loss and the samplers then use the velocity it
implies, v̂ = (x_t − x̂₀) / max(t, X0_MIN_T) — the same velocity loss, i.e. ‖x̂₀ − x₀‖² / max(t, t_min)²,
with a network that outputs an image (on the data manifold) rather than noise; the samplers clip x̂₀ to
the latent bound first (pixels).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

TIME_SAMPLINGS = ("uniform", "logit_normal")
SAMPLERS = ("euler", "heun")
PREDICTIONS = ("epsilon", "x0")  # what the head outputs: the velocity ("epsilon": the default name) | x̂₀
X0_MIN_T = 0.05  # x̂₀ → v̂ divides by max(t, this): near t = 0 the velocity is ill-posed from x̂₀ alone


def _bcast(values, x):
  return jnp.reshape(values, jnp.shape(values) + (1,) * (jnp.ndim(x) - jnp.ndim(values)))


def interpolate(x0, noise, t):
  """x_t = (1 − t)·x₀ + t·ε for t [...] broadcast over the trailing latent dims."""
  t = _bcast(jnp.asarray(t, jnp.float32), x0)
  return (1.0 - t) * x0 + t * noise


def velocity(x0, noise):
  """The target: v = ε − x₀."""
  return noise - x0


def velocity_from_x0(x0_hat, x_t, t, clip: float | None = None):
  """v̂ = (x_t − x̂₀) / max(t, X0_MIN_T) for t [...] broadcast over the latent dims; x̂₀ clipped to
  [−clip, clip] first when `clip` is given (sampling pixels)."""
  if clip is not None:
    x0_hat = jnp.clip(x0_hat, -clip, clip)
  return (x_t - x0_hat) / _bcast(jnp.maximum(jnp.asarray(t, jnp.float32), X0_MIN_T), x_t)


def shift_time(t, shift: float):
  """t ↦ α·t / (1 + (α − 1)·t): 0 and 1 stay put, α > 1 moves the middle towards noise."""
  if shift <= 0:
    raise ValueError(f"time shift {shift}; expected > 0 (1: none)")
  return shift * t / (1.0 + (shift - 1.0) * t)


def sample_times(rng, t_limit, *, sampling: str = "uniform", shift: float = 1.0, mean: float = 0.0,
                 std: float = 1.0, read_shift: float | None = None):
  """Training times t ∈ [0, t_limit] per image (t_limit [...] in (0, 1]: 1, or the captioning cap): drawn
  in [0, 1] by `sampling`, shifted, then scaled into [0, t_limit]. `read_shift` (None: `shift`) shifts the
  images that are read (t_limit < 1: a captioning example's), `shift` those that are written."""
  shape = jnp.shape(t_limit)
  if sampling == "uniform":
    t = jax.random.uniform(rng, shape)
  elif sampling == "logit_normal":
    t = jax.nn.sigmoid(mean + std * jax.random.normal(rng, shape))
  else:
    raise ValueError(f"flow time sampling {sampling!r}; expected one of {TIME_SAMPLINGS}")
  t_limit = jnp.asarray(t_limit, jnp.float32)
  shifted = shift_time(t, shift)
  if read_shift is not None and read_shift != shift:
    shifted = jnp.where(t_limit < 1.0, shift_time(t, read_shift), shifted)
  return shifted * t_limit


@dataclasses.dataclass(frozen=True)
class TimeSampling:
  """How training draws t (config `model.flow`): `sampling` uniform | logit_normal (σ(N(mean, std²))),
  then `shift`ed (1: none); images that are read (captioning) by `read_shift` (0: the same `shift`)."""
  sampling: str = "uniform"
  shift: float = 1.0
  mean: float = 0.0
  std: float = 1.0
  read_shift: float = 0.0

  def __post_init__(self):
    if self.sampling not in TIME_SAMPLINGS:
      raise ValueError(f"model.flow.time_sampling={self.sampling!r}; expected one of {TIME_SAMPLINGS}")
    if not self.shift > 0:
      raise ValueError(f"model.flow.shift={self.shift}; expected > 0 (1: none, > 1: more time at high noise)")
    if not self.std > 0:
      raise ValueError(f"model.flow.logit_std={self.std}; expected > 0")
    if self.read_shift < 0:
      raise ValueError(f"model.flow.read_shift={self.read_shift}; expected > 0 (or 0: the same as shift)")

  @classmethod
  def from_config(cls, node) -> "TimeSampling":
    return cls(str(node.time_sampling), float(node.shift), float(node.logit_mean), float(node.logit_std),
               float(node.get("read_shift", 0.0)))

  def draw(self, rng, t_limit):
    return sample_times(rng, t_limit, sampling=self.sampling, shift=self.shift, mean=self.mean, std=self.std,
                        read_shift=self.read_shift or None)


def time_grid(num_steps: int, shift: float = 1.0) -> np.ndarray:
  """num_steps + 1 times from 1 down to 0, evenly spaced before the shift (float64)."""
  if num_steps < 1:
    raise ValueError(f"num_steps={num_steps}; expected ≥ 1")
  t = np.linspace(1.0, 0.0, num_steps + 1)
  return shift * t / (1.0 + (shift - 1.0) * t)


def guide(v_cond, v_uncond, scale: float):
  """Classifier-free guidance on velocities: v_u + s·(v_c − v_u)."""
  return v_uncond + scale * (v_cond - v_uncond)


def sample(velocity_fn, x, *, num_steps: int, sampler: str = "euler", guidance: float | None = 1.0,
           shift: float = 1.0):
  """Integrates from noise `x` [N, ...] (t = 1) to t = 0 in `num_steps` steps.

  `velocity_fn(x, t)` returns v̂ at float time t: with guidance for the 2N rows [conditional;
  unconditional] (the same x for both halves, mixed by `guide`), without for the N conditional rows —
  the calling convention of `diffusion.sample`'s `eps_fn`, so a cached generator serves both.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"flow sampler {sampler!r}; expected one of {SAMPLERS}")
  times = time_grid(num_steps, shift)
  n = x.shape[0]

  def v_at(x, t):
    v = velocity_fn(x if guidance is None else jnp.concatenate([x, x]), float(t))
    return v if guidance is None else guide(v[:n], v[n:], guidance)

  for t, t_next in zip(times[:-1], times[1:]):
    dt = float(t_next - t)
    v = v_at(x, t)
    x_euler = x + dt * v
    if sampler == "heun" and t_next > 0:
      x = x + dt * 0.5 * (v + v_at(x_euler, t_next))
    else:
      x = x_euler
  return x
