"""`shapes`: a procedural, compositional image–caption dataset, and its detector.

32×32 RGB images on black with one or two filled objects, each in its own
quadrant: a circle, an axis-aligned square or an isosceles triangle (apex up),
10–12 px across, centred in its 16×16 quadrant with ±1 px jitter, in one of six
saturated colours. Caption: ``a {color} {shape} at the {position}``, objects in
raster order of their quadrants joined by `` and ``. Deterministic from a seed.

`detect` reads the objects back from an image (exact on rendered images), the
scorer for generated images; `parse_caption` reads a caption back.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
QUADRANT = 16
COLORS = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
    "yellow": (255, 255, 0), "magenta": (255, 0, 255), "cyan": (0, 255, 255),
}
COLOR_NAMES = tuple(COLORS)
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # quadrant 0..3, raster order
SIZES = (10, 11, 12)

# Fill ratio of an object's bounding box: square 1.0, circle ≈ π/4, triangle ≈ 1/2.
_SQUARE_MIN_FILL = 0.92
_CIRCLE_MIN_FILL = 0.66
_MIN_OBJECT_PIXELS = 12  # fewer lit pixels in a quadrant reads as empty (noise in generated images)


@dataclasses.dataclass(frozen=True)
class Obj:
  color: str
  shape: str
  quadrant: int


def render_object(canvas: np.ndarray, obj: Obj, size: int, jitter: tuple[int, int]) -> None:
  """Draws `obj` into `canvas` (uint8 [32, 32, 3]) in place."""
  qy, qx = divmod(obj.quadrant, 2)
  y0 = qy * QUADRANT + (QUADRANT - size) // 2 + jitter[0]
  x0 = qx * QUADRANT + (QUADRANT - size) // 2 + jitter[1]
  # Pixel centres relative to the box, in pixels.
  yy, xx = np.mgrid[0:size, 0:size] + 0.5
  half = size / 2
  if obj.shape == "square":
    inside = np.ones((size, size), bool)
  elif obj.shape == "circle":
    inside = (yy - half) ** 2 + (xx - half) ** 2 <= half ** 2
  elif obj.shape == "triangle":  # apex at the top centre, base along the bottom row
    inside = np.abs(xx - half) <= yy / 2
  else:
    raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
  canvas[y0:y0 + size, x0:x0 + size][inside] = COLORS[obj.color]


def caption(objects: list[Obj]) -> str:
  ordered = sorted(objects, key=lambda o: o.quadrant)
  return " and ".join(f"a {o.color} {o.shape} at the {POSITIONS[o.quadrant]}" for o in ordered)


_PHRASE = re.compile(r"a (\w+) (\w+) at the (top left|top right|bottom left|bottom right)")


def parse_caption(text: str) -> list[Obj] | None:
  """The objects a caption names, or None if it is not a well-formed shapes caption."""
  phrases = text.strip().split(" and ")
  objects = []
  for phrase in phrases:
    m = _PHRASE.fullmatch(phrase.strip())
    if not m or m[1] not in COLORS or m[2] not in SHAPES:
      return None
    objects.append(Obj(m[1], m[2], POSITIONS.index(m[3])))
  if len({o.quadrant for o in objects}) != len(objects):
    return None
  return objects


def sample_scene(rng: np.random.Generator) -> tuple[np.ndarray, list[Obj]]:
  """One random image and its objects."""
  count = int(rng.integers(1, 3))
  quadrants = sorted(rng.choice(4, size=count, replace=False).tolist())
  canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  objects = []
  for q in quadrants:
    obj = Obj(COLOR_NAMES[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))], q)
    render_object(canvas, obj, int(rng.choice(SIZES)), tuple(rng.integers(-1, 2, size=2).tolist()))
    objects.append(obj)
  return canvas, objects


def _largest_component(mask: np.ndarray) -> np.ndarray:
  """The largest 4-connected component of a small boolean mask."""
  labels = np.zeros(mask.shape, np.int32)
  best, best_size, label = None, 0, 0
  for start in zip(*np.nonzero(mask)):
    if labels[start]:
      continue
    label += 1
    stack, members = [start], []
    labels[start] = label
    while stack:
      y, x = stack.pop()
      members.append((y, x))
      for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
        if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
          labels[ny, nx] = label
          stack.append((ny, nx))
    if len(members) > best_size:
      best, best_size = label, len(members)
  return labels == best if best else np.zeros_like(mask)


def _color_name(pixels: np.ndarray) -> str:
  """The palette colour most of `pixels` ([N, 3] uint8) threshold to, or 'unknown'."""
  bits = pixels > 127
  codes, counts = np.unique(bits[:, 0] * 4 + bits[:, 1] * 2 + bits[:, 2], return_counts=True)
  code = int(codes[np.argmax(counts)])
  rgb = ((code >> 2) & 1, (code >> 1) & 1, code & 1)
  for name, value in COLORS.items():
    if tuple(int(v > 127) for v in value) == rgb:
      return name
  return "unknown"


def detect(image: np.ndarray) -> list[Obj]:
  """The objects in a 32×32 RGB image, one per non-empty quadrant, in quadrant order.

  Per quadrant: pixels with any channel above 127 are lit; fewer than
  `_MIN_OBJECT_PIXELS` lit means empty. The object is the largest connected lit
  blob; its colour is the majority thresholded colour, its shape follows from
  how much of its bounding box it fills.
  """
  image = np.asarray(image)
  if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
    raise ValueError(f"detect expects a {IMAGE_SIZE}x{IMAGE_SIZE}x3 image, got {image.shape}")
  objects = []
  for q in range(4):
    qy, qx = divmod(q, 2)
    patch = image[qy * QUADRANT:(qy + 1) * QUADRANT, qx * QUADRANT:(qx + 1) * QUADRANT]
    lit = patch.max(axis=-1) > 127
    if lit.sum() < _MIN_OBJECT_PIXELS:
      continue
    blob = _largest_component(lit)
    ys, xs = np.nonzero(blob)
    fill = blob.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "square" if fill >= _SQUARE_MIN_FILL else "circle" if fill >= _CIRCLE_MIN_FILL else "triangle"
    objects.append(Obj(_color_name(patch[blob]), shape, q))
  return objects


class ShapesConfig(tfds.core.BuilderConfig):
  """Split sizes; `small` is for tests."""

  def __init__(self, *, train: int, validation: int, test: int, seed: int = 0, **kwargs):
    super().__init__(**kwargs)
    self.sizes = {"train": train, "validation": validation, "test": test}
    self.seed = seed


class Shapes(tfds.core.GeneratorBasedBuilder):
  """The shapes dataset as a TFDS builder (write it with file_format='array_record')."""

  name = "shapes"
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [
      ShapesConfig(name="default", train=50_000, validation=1_000, test=1_000),
      ShapesConfig(name="small", train=2_000, validation=200, test=200),
  ]

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "caption": tfds.features.Text(),
            "image": tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
            # Per quadrant: colour / shape index, -1 where empty (for scoring).
            "colors": tfds.features.Tensor(shape=(4,), dtype=np.int32),
            "shapes": tfds.features.Tensor(shape=(4,), dtype=np.int32),
        }),
        supervised_keys=None)

  def _split_generators(self, dl_manager):
    del dl_manager  # procedural: nothing to download
    return {split: self._generate_examples(split) for split in self.builder_config.sizes}

  def _generate_examples(self, split):
    split_index = list(self.builder_config.sizes).index(split)
    rng = np.random.default_rng([self.builder_config.seed, split_index])
    for i in range(self.builder_config.sizes[split]):
      image, objects = sample_scene(rng)
      colors = np.full(4, -1, np.int32)
      shapes = np.full(4, -1, np.int32)
      for o in objects:
        colors[o.quadrant] = COLOR_NAMES.index(o.color)
        shapes[o.quadrant] = SHAPES.index(o.shape)
      yield i, {"caption": caption(objects), "image": image, "colors": colors, "shapes": shapes}
