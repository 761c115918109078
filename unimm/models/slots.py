"""Image slots in a packed row: where each image's positions are, and moving values in and out of them.

A row lays image k (1-based, `image_ids == k`) out as `P` consecutive slots (docs/design.md, the packed-row
contract). Families put per-image values into those slots — Transfusion its noised latent patches, the
code families their VQ codes, Janus its ViT features — and read the model's outputs back from them, all
with the functions here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def slot_index(image_ids):
  """For each position, its index inside its image (0 at text): [B, T]."""
  idx = jnp.arange(image_ids.shape[-1])
  prev = jnp.pad(image_ids, ((0, 0), (1, 0)))[:, :-1]
  starts = (image_ids > 0) & (image_ids != prev)
  start_pos = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return jnp.where(image_ids > 0, idx - start_pos, 0)


def first_positions(image_ids, max_images: int):
  """Position of each image's first slot: [B, M] (0 where the image is absent)."""
  onehot = image_ids[:, None, :] == jnp.arange(1, max_images + 1)[None, :, None]
  return jnp.argmax(onehot, axis=-1)


def values_at_slots(per_image, image_ids):
  """per_image [B, M, P, ...] → [B, T, ...]: at slot s of image k, per_image[:, k-1, s] (text positions get
  some image's value: mask them, as `scatter` does)."""
  b, m, p = per_image.shape[:3]
  flat = per_image.reshape(b, m * p, *per_image.shape[3:])
  index = jnp.clip((image_ids - 1) * p + slot_index(image_ids), 0, m * p - 1)
  return jnp.take_along_axis(flat, index.reshape(index.shape + (1,) * (flat.ndim - 2)), axis=1)


def scatter(x, per_image, image_ids):
  """x [B, T, ...] with every image slot replaced by its value from per_image [B, M, P, ...]."""
  at_slots = values_at_slots(per_image, image_ids)
  is_slot = (image_ids > 0).reshape(image_ids.shape + (1,) * (x.ndim - 2))
  return jnp.where(is_slot, at_slots.astype(x.dtype), x)


def gather(h, image_ids, max_images: int, slots: int):
  """The values at each image's slots: h [B, T, D] → [B, M, P, D] (absent images read position 0 on)."""
  b, t, d = h.shape
  first = first_positions(image_ids, max_images)
  pos = jnp.clip(first[:, :, None] + jnp.arange(slots), 0, t - 1).reshape(b, max_images * slots)
  return jnp.take_along_axis(h, pos[..., None], axis=1).reshape(b, max_images, slots, d)
