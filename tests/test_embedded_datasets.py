"""The embedded datasets: rendering follows the spec, the detector is exact, TFDS round trip."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from unimm.data import digits, shapes


def test_detector_exact_on_rendered_scenes():
  rng = np.random.default_rng(123)
  for _ in range(1500):
    image, objects = shapes.sample_scene(rng)
    assert shapes.detect(image) == objects


@pytest.mark.parametrize("shape", shapes.SHAPES)
@pytest.mark.parametrize("size", shapes.SIZES)
@pytest.mark.parametrize("quadrant", range(4))
def test_render_geometry_and_colour(shape, size, quadrant):
  for jitter in [(-1, -1), (0, 0), (1, 1), (1, -1)]:
    canvas = np.zeros((32, 32, 3), np.uint8)
    shapes.render_object(canvas, shapes.Obj("magenta", shape, quadrant), size, jitter)
    lit = canvas.max(-1) > 0
    ys, xs = np.nonzero(lit)
    qy, qx = divmod(quadrant, 2)
    # Inside its own quadrant, spanning `size` pixels, centred within ±1 px.
    assert ys.min() >= 16 * qy and ys.max() < 16 * (qy + 1)
    assert xs.min() >= 16 * qx and xs.max() < 16 * (qx + 1)
    assert xs.max() - xs.min() + 1 == size
    centre_x = (xs.min() + xs.max() + 1) / 2 - 16 * qx
    assert abs(centre_x - 8) <= 1.5
    assert set(map(tuple, canvas[lit])) == {(255, 0, 255)}
    if shape == "triangle":  # apex up: the top row is the narrowest, the bottom row the widest
      widths = lit[ys.min():ys.max() + 1].sum(axis=1)
      assert widths[0] == widths.min() and widths[-1] == widths.max() and widths[0] < widths[-1]


def test_caption_round_trip_and_format():
  objects = [shapes.Obj("cyan", "triangle", 3), shapes.Obj("red", "circle", 0)]
  text = shapes.caption(objects)
  assert text == "a red circle at the top left and a cyan triangle at the bottom right"
  assert shapes.parse_caption(text) == sorted(objects, key=lambda o: o.quadrant)
  assert shapes.parse_caption("a red circle at the middle") is None
  assert shapes.parse_caption("a red circle at the top left and a blue square at the top left") is None


def test_detector_reads_noisy_images():
  """A few stray lit pixels in an empty quadrant and speckles on the object don't change the verdict."""
  rng = np.random.default_rng(0)
  image, objects = shapes.sample_scene(rng)
  noisy = image.astype(np.int32) + rng.integers(-40, 40, image.shape)
  empty = [q for q in range(4) if q not in {o.quadrant for o in objects}]
  qy, qx = divmod(empty[0], 2)
  noisy[16 * qy + 3, 16 * qx + 3] = 255
  assert shapes.detect(np.clip(noisy, 0, 255).astype(np.uint8)) == objects


def test_shapes_tfds_round_trip(data_dir):
  ds = tfds.data_source("shapes/small", split="validation", data_dir=data_dir)
  assert len(ds) == 200
  for i in range(0, 200, 17):
    ex = ds[i]
    objects = shapes.parse_caption(ex["caption"].decode())
    assert objects is not None and shapes.detect(ex["image"]) == objects
    for o in objects:
      assert shapes.COLOR_NAMES[ex["colors"][o.quadrant]] == o.color
      assert shapes.SHAPES[ex["shapes"][o.quadrant]] == o.shape
    assert (ex["colors"] >= 0).sum() == len(objects)


def test_digits_tfds_matches_sklearn(data_dir):
  from sklearn.datasets import load_digits
  raw = load_digits()
  splits = {s: tfds.data_source("digits", split=s, data_dir=data_dir) for s in ("train", "validation", "test")}
  assert sum(len(v) for v in splits.values()) == 1797
  idx = digits.split_indices()
  assert len(set(np.concatenate(list(idx.values())))) == 1797
  test = splits["test"]
  for j in range(0, len(test), 13):
    ex = test[j]
    label = int(ex["label"])
    assert digits.parse_caption(ex["caption"].decode()) == label
    matches = [i for i in idx["test"] if raw.target[i] == label
               and np.array_equal(np.round(raw.images[i] * 255 / 16).astype(np.uint8), ex["image"][..., 0])]
    assert matches, "a test image that is not one of sklearn's test-split digits"
  assert splits["train"][0]["image"].shape == (8, 8, 1) and splits["train"][0]["image"].dtype == np.uint8
