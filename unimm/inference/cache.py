"""The backbone's KV cache as a pytree: allocate it (sharded), pick rows, join batches, move its write index.

Leaves (per layer, with a leading layer axis under `nn.scan`): `key`/`value`
[B, L, KV, D], `segment_ids`/`image_ids` [B, L], and `index`, the next slot to
write, shared by all rows. Slots never written keep segment 0, which the
attention rule ignores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_ROW_DIMS = {"key": 4, "value": 4, "segment_ids": 2, "image_ids": 2}  # a leaf's rank without the layer axis


def _leaf_name(path) -> str:
  return getattr(path[-1], "key", str(path[-1]))


def batch_axis(path, leaf) -> int | None:
  """The row axis of a cache leaf (None for `index`)."""
  rank = _ROW_DIMS.get(_leaf_name(path))
  return None if rank is None else leaf.ndim - rank


def empty(model, batch: int, length: int, placement):
  """Zeros shaped like `model`'s KV cache (decode mode) for `batch` rows of `length` slots, sharded."""
  with placement.context():
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *model.dummy_inputs(batch, length)))["cache"]
  shardings = jax.tree_util.tree_map_with_path(lambda p, s: placement.cache_sharding(s, batch_axis(p, s)), shapes)
  zeros = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), out_shardings=shardings)
  return zeros()


def take_rows(cache, rows: np.ndarray):
  """The cache of `rows` only (same length and write index), sharing no buffer with `cache` (so either
  may be donated)."""
  rows = jnp.asarray(rows)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.copy(x) if batch_axis(p, x) is None else jnp.take(x, rows, axis=batch_axis(p, x)), cache)


def concat_rows(first, second):
  """Rows of `first` then rows of `second` (both written up to the same index)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, a, b: a if batch_axis(p, a) is None else jnp.concatenate([a, b], axis=batch_axis(p, a)),
      first, second)


def with_index(cache, index: int):
  """The cache with its next write slot set to `index` (e.g. to write a short suffix at the end)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.full_like(x, index) if batch_axis(p, x) is None else x, cache)


def bucket(length: int, multiple: int = 64) -> int:
  """Cache lengths are rounded up so a few compiled shapes serve all requests."""
  return -(-length // multiple) * multiple


def length(cache) -> int:
  """Slots per row."""
  path, leaf = next((p, x) for p, x in jax.tree_util.tree_leaves_with_path(cache) if batch_axis(p, x) is not None)
  return int(leaf.shape[batch_axis(path, leaf) + 1])


def grow(cache, new_length: int):
  """The cache with room for `new_length` slots per row (new slots empty: segment 0)."""
  def pad(path, x):
    axis = batch_axis(path, x)
    if axis is None:
      return x
    widths = [(0, 0)] * x.ndim
    widths[axis + 1] = (0, new_length - x.shape[axis + 1])
    return jnp.pad(x, widths)
  return jax.tree_util.tree_map_with_path(pad, cache)
