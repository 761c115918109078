"""Shared building blocks: RMSNorm, dense layers with logical axes, RoPE, SwiGLU.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`)
and large activations are constrained with `nn.with_logical_constraint`; the
config's rules map those names onto the mesh (`unimm/parallel/sharding.py`).
Parameters are float32; `dtype` is the compute dtype.

Logical names used here (params / activations):
  embed, mlp, heads, head_dim, vocab, layers   |   act_batch, act_length, act_embed,
  act_heads, act_mlp, act_vocab
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm.models import axes

Dtype = Any
init_normal = nn.initializers.normal


def constrain(x, names: Sequence[str | None]):
  """`nn.with_logical_constraint` (a no-op outside a mesh with rules)."""
  return nn.with_logical_constraint(x, tuple(names))


class RMSNorm(nn.Module):
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  axis_name: str = axes.EMBED

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


class HeadLayerNorm(nn.Module):
  """LayerNorm of each head's vector [..., N, H] with a scale and bias per head [N, H] (Chameleon's QK-norm,
  as its reference computes it: statistics over H, eps 1e-5)."""

  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  heads_axis: str = axes.HEADS

  @nn.compact
  def __call__(self, x):
    shape = x.shape[-2:]
    names = (self.heads_axis, axes.HEAD_DIM)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, names), shape, jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, names), shape, jnp.float32)
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
    return (y * scale + bias).astype(self.dtype)


class DenseGeneral(nn.Module):
  """A projection of the last `len(in_axes)` axes onto `features`, with logical names; bias-free unless
  `use_bias` (Qwen2's q/k/v)."""

  features: tuple[int, ...]
  in_names: tuple[str, ...]
  out_names: tuple[str, ...]
  num_in_axes: int = 1
  dtype: Dtype = jnp.float32
  init_scale: float = 1.0
  # The output's dtype (the matmul accumulates in it; None: `dtype`). Output heads ask for float32: bf16
  # logits are spaced 0.0625 in [8, 16), too coarse for the softmax and the z-loss.
  out_dtype: Dtype | None = None
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[-self.num_in_axes:]
    fan_in = 1
    for d in in_shape:
      fan_in *= d
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(init_normal(self.init_scale / fan_in ** 0.5), self.in_names + self.out_names),
        (*in_shape, *self.features), jnp.float32)
    lhs = tuple(range(x.ndim - self.num_in_axes, x.ndim))
    rhs = tuple(range(self.num_in_axes))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), ((lhs, rhs), ((), ())),
                            preferred_element_type=self.out_dtype)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.out_names), self.features,
                        jnp.float32)
      y = y + bias.astype(y.dtype)
    return y


ROPE_SCALINGS = ("none", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE's frequency scaling for a context longer than pretraining's, as Hugging Face defines it: `linear`
  (every frequency / factor: positions interpolated) or `llama3` (Llama 3.1: wavelengths longer than
  original_max_positions / low_freq_factor divided by `factor`, shorter than original / high_freq_factor
  kept, those between interpolated smoothly)."""

  kind: str = "none"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_positions: int = 8192

  def __post_init__(self):
    if self.kind not in ROPE_SCALINGS:
      raise ValueError(f"RoPE scaling {self.kind!r}; expected one of {ROPE_SCALINGS}")


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling = RopeScaling()):
  """The rotation frequencies (radians per position) of a head's H/2 pairs, float32 as the reference's."""
  freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  if scaling.kind == "linear":
    return freq / scaling.factor
  if scaling.kind == "llama3":
    wavelength = 2 * math.pi / freq
    low_wavelength = scaling.original_max_positions / scaling.low_freq_factor  # longer: scaled down
    high_wavelength = scaling.original_max_positions / scaling.high_freq_factor  # shorter: kept
    smooth = (scaling.original_max_positions / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    scaled = jnp.where(wavelength > low_wavelength, freq / scaling.factor, freq)
    between = (wavelength >= high_wavelength) & (wavelength <= low_wavelength)
    return jnp.where(between, (1 - smooth) * scaled / scaling.factor + smooth * scaled, scaled)
  return freq


def rope(x, positions, *, theta: float = 10000.0, scaling: RopeScaling = RopeScaling()):
  """Rotary position embedding of x [B, T, N, H] at integer positions [B, T] (half-split layout)."""
  head_dim = x.shape[-1]
  freq = rope_frequencies(head_dim, theta, scaling)
  angle = positions[..., None].astype(jnp.float32) * freq  # [B, T, H/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class SwiGLU(nn.Module):
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    gate = DenseGeneral((self.hidden,), (axes.EMBED,), (axes.MLP,), dtype=self.dtype, name="gate")(x)
    up = DenseGeneral((self.hidden,), (axes.EMBED,), (axes.MLP,), dtype=self.dtype, name="up")(x)
    h = constrain(nn.silu(gate) * up, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_MLP))
    return DenseGeneral((dim,), (axes.MLP,), (axes.EMBED,), dtype=self.dtype, name="down")(h)


def mlp_hidden(dim: int, multiple_of: int = 256) -> int:
  """Llama's SwiGLU width: 8/3·dim rounded up to a multiple (keeps FLOPs ≈ a 4·dim MLP)."""
  hidden = int(8 * dim / 3)
  return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class Embed(nn.Module):
  num_embeddings: int
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids):
    table = self.param("embedding", nn.with_logical_partitioning(init_normal(1.0), (axes.VOCAB, axes.EMBED)),
                       (self.num_embeddings, self.features), jnp.float32)
    return jnp.take(table, ids, axis=0).astype(self.dtype)


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """Sinusoidal embedding of (integer or real) diffusion timesteps t [...] → [..., dim]."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepMLP(nn.Module):
  """Timestep → model-width vector (sinusoid, then a 2-layer MLP)."""

  features: int
  dtype: Dtype = jnp.float32
  frequency_dim: int = 256

  @nn.compact
  def __call__(self, t):
    h = timestep_embedding(t, self.frequency_dim).astype(self.dtype)
    h = DenseGeneral((self.features,), (axes.TIME_FREQ,), (axes.EMBED,), dtype=self.dtype, name="fc1")(h)
    h = DenseGeneral((self.features,), (axes.EMBED_IN,), (axes.EMBED,), dtype=self.dtype, name="fc2")(nn.silu(h))
    return h


def _named(init, names):
  return nn.with_logical_partitioning(init, names)


def conv(features: int, kernel=(3, 3), *, strides=(1, 1), transpose: bool = False, zero_init: bool = False,
         dtype: Dtype = jnp.float32, name: str | None = None):
  """A biased (transposed) convolution whose params carry logical names (conv_in, conv_out)."""
  init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
  cls = nn.ConvTranspose if transpose else nn.Conv
  return cls(features, tuple(kernel), strides=tuple(strides), dtype=dtype, name=name,
             kernel_init=_named(init, (None, None, axes.CONV_IN, axes.CONV_OUT)),
             bias_init=_named(nn.initializers.zeros, (axes.CONV_OUT,)))


def group_norm(channels: int, groups: int = 8, *, dtype: Dtype = jnp.float32, name: str | None = None):
  """GroupNorm with min(groups, channels) groups and named params."""
  return nn.GroupNorm(min(groups, channels), dtype=dtype, name=name,
                      scale_init=_named(nn.initializers.ones, (axes.CONV_OUT,)),
                      bias_init=_named(nn.initializers.zeros, (axes.CONV_OUT,)))


def dense(features: int, in_name: str = axes.EMBED_IN, out_name: str = axes.CONV_OUT, *, dtype: Dtype = jnp.float32,
          out_dtype: Dtype | None = None, name: str | None = None):
  """A biased dense layer with named params (for conv stacks; the backbone uses DenseGeneral); `out_dtype`
  as DenseGeneral's (float32 for output heads)."""
  dot = None if out_dtype is None else functools.partial(jax.lax.dot_general, preferred_element_type=out_dtype)
  return nn.Dense(features, dtype=dtype, name=name, dot_general=dot,
                  kernel_init=_named(nn.initializers.lecun_normal(), (in_name, out_name)),
                  bias_init=_named(nn.initializers.zeros, (out_name,)))
