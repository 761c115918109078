"""Images in and out: bounded opening of user images, fitting them to a square, grids as PNG."""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

MAX_IMAGE_PIXELS = 8192 * 8192  # input images above this are refused before decoding (decompression bombs)


class ImageTooLarge(ValueError):
  """An input image with more pixels than the limit, refused from its header before decoding."""


def open_bounded(source, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
  """PIL's lazy open of `source` (a path or a file object) for input a user handed in: raises
  `ImageTooLarge` for more than `max_pixels` pixels before anything is decoded (PIL's own bomb check
  included); other bad data raises PIL's errors as usual."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size check below says it
    try:
      im = Image.open(source)
    except Image.DecompressionBombError as e:
      raise ImageTooLarge(f"too large ({e}); the limit is {max_pixels} pixels") from e
  if im.width * im.height > max_pixels:
    im.close()
    raise ImageTooLarge(f"{im.width}×{im.height} = {im.width * im.height} pixels; the limit is {max_pixels}")
  return im


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


FITS = ("crop", "pad")
PAD_FILL = 127  # Janus's pad colour: SigLIP's mean (0.5) in 8 bits


def fit_square(im: Image.Image, size: int, fit: str = "crop", fill: int = PAD_FILL, min_side: int = 14) -> Image.Image:
  """`im` as a size×size image. `crop`: the centred square of the short side, resized (what an image the
  model writes is trained on); `pad`: resized so the long side is `size` (the short one rounded, at least
  `min_side`), centred on a square of `fill` — Janus's understanding images (its VLMImageProcessor):
  the whole picture, letterboxed."""
  if fit not in FITS:
    raise ValueError(f"image fit {fit!r}; expected one of {FITS}")
  w, h = im.size
  if fit == "crop":
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side))
    return im if side == size else im.resize((size, size), Image.Resampling.BICUBIC)
  scale = size / max(w, h)
  inner = (min(size, max(round(w * scale), min_side)), min(size, max(round(h * scale), min_side)))
  if inner != (w, h):
    im = im.resize(inner, Image.Resampling.BICUBIC)
  canvas = Image.new(im.mode, (size, size), fill if im.mode == "L" else (fill,) * len(im.getbands()))
  canvas.paste(im, ((size - inner[0]) // 2, (size - inner[1]) // 2))
  return canvas
