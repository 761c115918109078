"""LPIPS-style perceptual distance (Zhang et al. 2018) for training image tokenizers.

A frozen VGG16 feature stack (3×3 convs + ReLU, 2×2 max-pool between blocks)
reads both images (scaled like LPIPS: x in [-1, 1], shifted and scaled per
channel); at the end of each block the features are unit-normalised over
channels, their squared difference is weighted per channel by LPIPS' linear
layer, averaged over space and summed over blocks.

Nothing is downloaded: `load(path)` reads a local ``.npz`` with
``conv{b}_{i}_kernel`` [3, 3, in, out] (HWIO) and ``conv{b}_{i}_bias`` for
block b (0–4) and conv i, and ``lin{b}`` [channels_b] (non-negative). Convert
torchvision's VGG16 and LPIPS v0.1's ``vgg.pth`` once, offline (PyTorch keeps
kernels as OIHW: transpose to HWIO). Other block layouts (e.g. a small net in
tests) work the same way: the file defines the architecture.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)  # LPIPS' ScalingLayer, for inputs in [-1, 1]
SCALE = np.array([0.458, 0.448, 0.450], np.float32)


def load(path: str) -> dict:
  """{"blocks": [[(kernel, bias), …] per block], "lins": [weights per block]} from a .npz file."""
  with np.load(path) as f:
    arrays = {k: np.asarray(f[k], np.float32) for k in f.files}
  return from_arrays(arrays)


def from_arrays(arrays: dict) -> dict:
  convs = {}
  for key in arrays:
    m = re.fullmatch(r"conv(\d+)_(\d+)_kernel", key)
    if m:
      convs.setdefault(int(m[1]), []).append(int(m[2]))
  if not convs:
    raise ValueError("perceptual weights hold no conv{b}_{i}_kernel arrays")
  blocks, lins = [], []
  for b in sorted(convs):
    blocks.append([(arrays[f"conv{b}_{i}_kernel"], arrays[f"conv{b}_{i}_bias"]) for i in sorted(convs[b])])
    if f"lin{b}" not in arrays:
      raise ValueError(f"perceptual weights lack lin{b} (LPIPS' channel weights for block {b})")
    lins.append(arrays[f"lin{b}"])
  return {"blocks": blocks, "lins": lins}


def features(weights: dict, x) -> list:
  """x [N, H, W, C] in [-1, 1] → each block's last ReLU output."""
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = (x - SHIFT) / SCALE
  out = []
  for b, convs in enumerate(weights["blocks"]):
    if b:
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    for kernel, bias in convs:
      x = jax.lax.conv_general_dilated(x, jnp.asarray(kernel, x.dtype), (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
      x = jax.nn.relu(x)
    out.append(x)
  return out


def lpips(weights: dict, x, y):
  """Perceptual distance per image [N] between x and y [N, H, W, C] in [-1, 1]."""
  total = 0.0
  for fx, fy, lin in zip(features(weights, x), features(weights, y), weights["lins"]):
    nx = fx / (jnp.sqrt(jnp.sum(jnp.square(fx), -1, keepdims=True)) + 1e-10)
    ny = fy / (jnp.sqrt(jnp.sum(jnp.square(fy), -1, keepdims=True)) + 1e-10)
    total = total + jnp.mean(jnp.sum(jnp.square(nx - ny) * lin, -1), axis=(1, 2))
  return total
