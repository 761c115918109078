"""Patch layers: latent images ↔ sequences of model vectors (Transfusion §3.2).

* `LinearPatch`: each k×k latent patch is flattened and projected to the
  model width; the inverse projection maps outputs back to patches.
* `UNetPatch`: U-Net down blocks (residual conv blocks, GroupNorm, ×2
  downsampling per level, timestep-conditioned) turn the latent into a grid of
  model vectors; mirrored up blocks (with the down path's skip connections)
  map the transformer's outputs back. Width and depth come from the config
  (the paper's adds ~0.27B at its scale).

Both take latents [B, M, h, w, c] and a timestep embedding [B, M, D] and give
[B, M, P, D], P = (h/k)·(w/k) in raster order; `decode` returns [B, M, h, w, c].
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from unimm.models import axes, layers


def patchify(x, k: int):
  """[N, h, w, c] → [N, (h/k)(w/k), k·k·c], raster order."""
  n, h, w, c = x.shape
  if h % k or w % k:
    raise ValueError(f"latent {h}x{w} does not divide into {k}x{k} patches")
  x = x.reshape(n, h // k, k, w // k, k, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (h // k) * (w // k), k * k * c)


def unpatchify(x, k: int, h: int, w: int, c: int):
  """Inverse of `patchify`."""
  n = x.shape[0]
  x = x.reshape(n, h // k, w // k, k, k, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h, w, c)


POSITIONS = ("none", "sincos")


def sincos_2d(grid_h: int, grid_w: int, dim: int, max_period: float = 10000.0) -> np.ndarray:
  """Fixed 2D sin-cos position embeddings [grid_h·grid_w, dim] in raster order (float32; MAE / DiT):
  the first half of the dims encodes the patch's row, the second its column, each as
  [sin(p·ω_0..ω_{q−1}), cos(p·ω_0..ω_{q−1})] with q = dim/4, ω_i = max_period^(−i/q)."""
  if dim % 4:
    raise ValueError(f"2D sin-cos position embeddings split the width into 4 parts; width {dim} is not a multiple of 4")
  q = dim // 4
  omega = max_period ** (-np.arange(q, dtype=np.float64) / q)
  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")

  def encode(p):
    angles = p.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  return np.concatenate([encode(rows), encode(cols)], axis=1).astype(np.float32)


class LinearPatch(nn.Module):
  """`position`: "none" (the paper: a patch knows where it is only from its place in the sequence, 1D RoPE)
  or "sincos" (fixed 2D sin-cos embeddings of the patch's row and column added to its vector, as DiT
  does, so a patch need not infer its neighbours above and below from 1D offsets a grid width apart; on
  the shapes demo it lifted captioning, not the drawing: the README's ablations)."""

  patch_size: int
  dim: int
  latent_shape: tuple[int, int, int]  # h, w, c
  position: str = "none"
  dtype: str = "float32"

  def setup(self):
    if self.position not in POSITIONS:
      raise ValueError(f"model.patch_position={self.position!r}; expected one of {POSITIONS}")
    k, c = self.patch_size, self.latent_shape[2]
    self.proj_in = layers.DenseGeneral((self.dim,), (axes.PATCH,), (axes.EMBED,), dtype=self.dtype)
    self.proj_out = layers.DenseGeneral((k * k * c,), (axes.EMBED,), (axes.PATCH,), dtype=self.dtype, init_scale=0.0)

  def encode(self, latents, t_emb):
    b, m = latents.shape[:2]
    h, w, _ = self.latent_shape
    x = patchify(latents.reshape(b * m, *latents.shape[2:]), self.patch_size)
    x = self.proj_in(x).reshape(b, m, x.shape[1], self.dim)  # explicit sizes: m may be 0 (text-only rows)
    if self.position == "sincos":
      x = x + jnp.asarray(sincos_2d(h // self.patch_size, w // self.patch_size, self.dim), x.dtype)
    return x + t_emb[:, :, None, :].astype(x.dtype), None

  def decode(self, hidden, t_emb, aux):
    del t_emb, aux
    b, m, p, _ = hidden.shape
    h, w, c = self.latent_shape
    x = self.proj_out(hidden.reshape(b * m, p, self.dim))
    return unpatchify(x, self.patch_size, h, w, c).reshape(b, m, h, w, c)


class ResBlock(nn.Module):
  """GroupNorm → SiLU → conv, twice, with a timestep shift; residual (1×1 conv if widths differ)."""

  channels: int
  groups: int = 8
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, t_emb=None):
    h = layers.conv(self.channels, dtype=self.dtype, name="conv1")(
        nn.silu(layers.group_norm(x.shape[-1], self.groups, dtype=self.dtype, name="norm1")(x)))
    if t_emb is not None:
      h = h + layers.dense(self.channels, dtype=self.dtype, name="time")(nn.silu(t_emb))[:, None, None, :]
    h = layers.conv(self.channels, zero_init=True, dtype=self.dtype, name="conv2")(
        nn.silu(layers.group_norm(self.channels, self.groups, dtype=self.dtype, name="norm2")(h)))
    if x.shape[-1] != self.channels:
      x = layers.conv(self.channels, (1, 1), dtype=self.dtype, name="skip")(x)
    return x + h


class UNetPatch(nn.Module):
  patch_size: int  # a power of two: one ×2 level per factor of 2
  dim: int
  latent_shape: tuple[int, int, int]
  channels: Sequence[int] = (64, 128)  # width per level (len = log2(patch_size) + 1 entries used)
  blocks_per_level: int = 1
  dtype: str = "float32"

  def _levels(self) -> int:
    levels = int(round(math.log2(self.patch_size)))
    if 2 ** levels != self.patch_size:
      raise ValueError(f"UNetPatch needs a power-of-two patch size, got {self.patch_size}")
    if len(self.channels) < levels + 1:
      raise ValueError(f"UNetPatch with patch {self.patch_size} needs {levels + 1} channel widths, got {self.channels}")
    return levels

  def setup(self):
    levels = self._levels()
    ch = list(self.channels)[:levels + 1]
    c = self.latent_shape[2]
    self.stem = layers.conv(ch[0], dtype=self.dtype)
    self.down = [[ResBlock(ch[i], dtype=self.dtype) for _ in range(self.blocks_per_level)] for i in range(levels + 1)]
    self.downsample = [layers.conv(ch[i + 1], strides=(2, 2), dtype=self.dtype) for i in range(levels)]
    self.to_model = layers.dense(self.dim, axes.CONV_IN, axes.EMBED, dtype=self.dtype)
    self.from_model = layers.dense(ch[levels], axes.EMBED, axes.CONV_OUT, dtype=self.dtype)
    self.up = [[ResBlock(ch[i], dtype=self.dtype) for _ in range(self.blocks_per_level)] for i in range(levels + 1)]
    self.upsample = [layers.conv(ch[i], (2, 2), strides=(2, 2), transpose=True, dtype=self.dtype)
                     for i in range(levels)]
    self.out_norm = layers.group_norm(ch[0], dtype=self.dtype)
    self.out = layers.conv(c, zero_init=True, dtype=self.dtype)

  def encode(self, latents, t_emb):
    b, m = latents.shape[:2]
    te = t_emb.reshape(b * m, t_emb.shape[-1])
    x = self.stem(latents.reshape(b * m, *latents.shape[2:]).astype(self.dtype))
    skips = []
    for i, blocks in enumerate(self.down):
      for block in blocks:
        x = block(x, te)
      skips.append(x)
      if i < len(self.downsample):
        x = self.downsample[i](x)
    n, gh, gw, _ = x.shape
    x = self.to_model(x).reshape(b, m, gh * gw, self.dim)
    return x + t_emb[:, :, None, :].astype(x.dtype), skips

  def decode(self, hidden, t_emb, skips):
    b, m, p, _ = hidden.shape
    te = t_emb.reshape(b * m, t_emb.shape[-1])
    h, w, _ = self.latent_shape
    k = self.patch_size
    x = self.from_model(hidden.reshape(b * m, h // k, w // k, self.dim))
    for i in reversed(range(len(self.up))):
      x = x + skips[i]
      for block in self.up[i]:
        x = block(x, te)
      if i > 0:
        x = self.upsample[i - 1](x)
    x = self.out(nn.silu(self.out_norm(x)))
    return x.reshape(b, m, *self.latent_shape)
