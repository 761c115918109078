"""Writing images for people to look at: grids of uint8 images as PNG."""

from __future__ import annotations

import numpy as np
from PIL import Image


def image_grid(images: np.ndarray, columns: int = 8, min_side: int = 64, gap: int = 2) -> np.ndarray:
  """uint8 [N, H, W, C] → one RGB grid, nearest-neighbour upscaled to ≥ `min_side` px, grey gaps."""
  n, h, w, c = images.shape
  scale = max(1, min_side // max(h, w))
  images = images.repeat(scale, 1).repeat(scale, 2)
  if c == 1:
    images = images.repeat(3, axis=-1)
  h, w = h * scale, w * scale
  columns = max(1, min(columns, n))
  rows = -(-n // columns)
  grid = np.full((rows * (h + gap) - gap, columns * (w + gap) - gap, 3), 96, np.uint8)
  for i, im in enumerate(images):
    r, col = divmod(i, columns)
    grid[r * (h + gap):r * (h + gap) + h, col * (w + gap):col * (w + gap) + w] = im
  return grid


def save_image_grid(images: np.ndarray, path: str, columns: int = 8) -> None:
  if len(images):
    Image.fromarray(image_grid(np.asarray(images), columns)).save(path)
