"""The backbone's KV cache: any chunking of a row (prompt, image block, single tokens) gives the
uncached outputs, for left-padded rows of different lengths."""

import jax
import numpy as np
import pytest

from unimm.models import backbone


def rows():
  """Two left-padded single-document rows of 20 slots, each with a 4-slot image block."""
  T = 20
  seg = np.zeros((2, T), np.int32)
  img = np.zeros((2, T), np.int32)
  pos = np.zeros((2, T), np.int32)
  for b, start in enumerate((3, 7)):  # left padding of 3 and 7
    seg[b, start:] = 1
    pos[b, start:] = np.arange(T - start)
    img[b, start + 3:start + 7] = 1
  return seg, img, pos


@pytest.mark.slow
@pytest.mark.parametrize("scan,bidirectional,mot", [(True, True, ()), (True, False, ()), (False, True, ()),
                                                    (False, False, ()), (True, True, backbone.MOT_PARTS)])
def test_cached_equals_uncached(scan, bidirectional, mot):
  """`mot`: a Mixture-of-Transformers backbone, whose image slots' copies must be picked when cached too."""
  cfg = backbone.BackboneConfig(num_layers=2, dim=32, num_heads=4, num_kv_heads=2, dtype="float32",
                                remat="full", scan=scan, bidirectional_images=bidirectional, attention="xla",
                                qk_norm=True, mot=mot)
  seg, img, pos = rows()
  x = jax.random.normal(jax.random.key(0), (2, 20, 32))
  model = backbone.Backbone(cfg)
  params = jax.jit(model.init)(jax.random.key(1), x, pos, seg, img)["params"]
  want = np.asarray(jax.jit(model.apply)({"params": params}, x, pos, seg, img))

  cached = backbone.Backbone(cfg, decode=True)
  cache = jax.jit(cached.init)(jax.random.key(1), x, pos, seg, img)["cache"]
  step = jax.jit(lambda c, *a: cached.apply({"params": params, "cache": c}, *a, mutable=["cache"]))
  got = []
  # A prompt holding row 0's whole image (slots 6..9), row 1's image (slots 10..13) as one chunk,
  # as generation feeds an image, then one token at a time.
  for lo, hi in [(0, 10), (10, 14), *[(t, t + 1) for t in range(14, 20)]]:
    out, mutated = step(cache, x[:, lo:hi], pos[:, lo:hi], seg[:, lo:hi], img[:, lo:hi])
    cache = mutated["cache"]
    got.append(np.asarray(out))
  got = np.concatenate(got, axis=1)
  real = seg > 0  # padding rows attend to nothing: their outputs are meaningless either way
  bad = np.argwhere(np.abs(got - want).max(-1) * real > 2e-5)
  assert not len(bad), bad.tolist()
  assert int(jax.tree.leaves(cache["layers" if scan else "layer_0"]["attn"]["index"])[0].max()) == 20
