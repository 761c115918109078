"""The attention rule (docs/design.md, the packed example) against a brute-force loop, on random packed rows."""

import jax.numpy as jnp
import numpy as np
import pytest

from unimm.data import packed


def random_row(rng, length=48):
  """Random documents with random images inside, then padding."""
  seg = np.zeros(length, np.int32)
  img = np.zeros(length, np.int32)
  t, s, k = 0, 0, 0
  while t < length - 4 and rng.random() < 0.9:
    s += 1
    n = int(rng.integers(2, 20))
    end = min(length - int(rng.integers(0, 3)), t + n)
    seg[t:end] = s
    u = t + 1
    while u < end - 2 and rng.random() < 0.5:
      m = int(rng.integers(1, 6))
      stop = min(end - 1, u + m)
      k += 1
      img[u:stop] = k
      u = stop + int(rng.integers(1, 3))
    t = end
  return seg, img


def brute_force(seg, img, bidirectional_images):
  n = len(seg)
  out = np.zeros((n, n), bool)
  for q in range(n):
    for k in range(n):
      same_doc = seg[q] == seg[k] and seg[q] != 0
      same_image = img[q] == img[k] and img[q] != 0 and bidirectional_images
      out[q, k] = same_doc and (k <= q or same_image)
  return out


@pytest.mark.parametrize("bidirectional_images", [True, False])
def test_mask_matches_brute_force(bidirectional_images):
  rng = np.random.default_rng(0)
  for _ in range(40):
    seg, img = random_row(rng)
    want = brute_force(seg, img, bidirectional_images)
    got = packed.attention_mask(seg, img, bidirectional_images=bidirectional_images)
    np.testing.assert_array_equal(got, want)
    got_jax = packed.attention_mask(jnp.asarray(seg), jnp.asarray(img), bidirectional_images=bidirectional_images)
    np.testing.assert_array_equal(np.asarray(got_jax), want)


def test_mask_batched():
  rng = np.random.default_rng(1)
  rows = [random_row(rng) for _ in range(3)]
  seg = np.stack([r[0] for r in rows])
  img = np.stack([r[1] for r in rows])
  got = packed.attention_mask(seg, img)
  assert got.shape == (3, 48, 48)
  for b in range(3):
    np.testing.assert_array_equal(got[b], brute_force(seg[b], img[b], True))
