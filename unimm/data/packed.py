"""The packed example: the contract between the data pipeline and the models.

A batch is a dict of numpy arrays with a leading batch axis B; per row:

================  ==================  ===========================================================
field             dtype / shape       meaning
================  ==================  ===========================================================
tokens            int32 [T]           text token ids; the IMG placeholder id at image slots
segment_ids       int32 [T]           document of the pack (1, 2, …; a document longer than the row
                                      is split into chunks, each its own segment, see `packing`);
                                      0 = padding
positions         int32 [T]           position inside its segment (RoPE), 0 at padding
image_ids         int32 [T]           0 for text; k ≥ 1 for the row's k-th image (k-1 indexes `images`)
loss_weights      float32 [T]         weight of the next-token target (tokens[t+1]) predicted at t:
                                      0 on padding, on a document's last token and on masked
                                      prompts; where the target or the position is an image
                                      slot or EOI, the family's ``image_token_weight`` (0 for
                                      continuous images, Transfusion; > 0 for image codes)
images            uint8 [M, H, W, C]  the row's images in slot order, zeros where unused
image_valid       bool [M]            which of `images` are real
image_t_max       int32 [M]           diffusion noise limit per image (T_max, or the noise
                                      limit when the image conditions later text); 0 if unused
image_written     bool [M]            the image's role: written (generated; not followed by text in
                                      its document) or read (conditions later text); Janus picks
                                      its encoder by it (VQ codes vs ViT features)
stats             {reason: int32}     records skipped since the previous row of this packer
                                      (see `documents.SKIP_REASONS`); sum over batches for totals
================  ==================  ===========================================================

Images lie between BOI and EOI tokens, one slot per latent patch, raster order.

A model reads the first four fields as one `Rows` (`Rows.of(batch)`); the rows that are not packed by the
pipeline (init shapes, prompts, caption rows, generation steps) are made by its constructors.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import numpy as np

ROW_FIELDS = ("tokens", "segment_ids", "positions", "image_ids", "loss_weights")
IMAGE_FIELDS = ("images", "image_valid", "image_t_max", "image_written")


@flax.struct.dataclass
class Rows:
  """What a model reads of B rows of T slots: `tokens`, `positions`, `segment_ids`, `image_ids`, each int32
  [B, T], as in the table above. A pytree: jit arguments, `jax.device_put` and `.replace(tokens=…)` work."""

  tokens: Any
  positions: Any
  segment_ids: Any
  image_ids: Any

  @classmethod
  def of(cls, batch: dict) -> "Rows":
    """The rows of a packed batch (or of any dict with these four fields)."""
    return cls(batch["tokens"], batch["positions"], batch["segment_ids"], batch["image_ids"])

  @classmethod
  def one_document(cls, batch: int, length: int) -> "Rows":
    """Rows of one all-text document each, zero ids: the shapes that init params and caches."""
    zeros = lambda: np.zeros((batch, length), np.int32)  # pylint: disable=unnecessary-lambda-assignment
    return cls(zeros(), zeros(), np.ones((batch, length), np.int32), zeros())

  @classmethod
  def padded(cls, documents: Sequence[tuple[Sequence[int], Sequence[int]]], length: int, pad_id: int, *,
             left: bool = False, first_positions: Sequence[int] | None = None) -> "Rows":
    """One document a row from `(tokens, image_ids)` pairs, padded to `length` slots (padding: `pad_id`,
    segment 0, position 0) on the right, or on the `left` (prompts, which must all end at the same slot).
    Positions count from `first_positions` (default 0: a document's first slot), e.g. for a step that
    writes a document's continuation into a KV cache; an empty document is a row of padding."""
    b = len(documents)
    tokens = np.full((b, length), pad_id, np.int32)
    positions, segment_ids, image_ids = (np.zeros((b, length), np.int32) for _ in range(3))
    for i, (doc_tokens, doc_image_ids) in enumerate(documents):
      n = len(doc_tokens)
      if n > length:
        raise ValueError(f"row {i} holds {n} tokens, more than its {length} slots")
      span = slice(length - n, length) if left else slice(0, n)
      tokens[i, span] = doc_tokens
      positions[i, span] = np.arange(n) + (0 if first_positions is None else first_positions[i])
      segment_ids[i, span] = 1 if n else 0
      image_ids[i, span] = doc_image_ids
    return cls(tokens, positions, segment_ids, image_ids)


def example_batch(batch: int, seq_len: int, max_images: int, image_shape) -> dict:
  """A batch of the contract's shapes (one document a row, no images): for init and shape tracing."""
  rows = Rows.one_document(batch, seq_len)
  return {
      "tokens": rows.tokens,
      "segment_ids": rows.segment_ids,
      "positions": rows.positions,
      "image_ids": rows.image_ids,
      "loss_weights": np.zeros((batch, seq_len), np.float32),
      "images": np.zeros((batch, max_images, *image_shape), np.uint8),
      "image_valid": np.zeros((batch, max_images), bool),
      "image_t_max": np.zeros((batch, max_images), np.int32),
      "image_written": np.zeros((batch, max_images), bool),
  }


def attention_mask(segment_ids, image_ids, *, bidirectional_images: bool = True,
                   key_segment_ids=None, key_image_ids=None, query_offset=0):
  """Which keys each query may attend to: bool [..., T(query), S(key)].

  ``allowed(q, k) = seg[q] == seg[k] != 0 and (k <= q or img[q] == img[k] != 0)``:
  causal, no attention across packed documents or from/to padding, and (when
  `bidirectional_images`, the Transfusion rule) full attention inside each image.
  Works on numpy and jax arrays alike; this is the reference every attention
  kernel is tested against.

  With a KV cache the keys are the cache's slots (`key_segment_ids`,
  `key_image_ids`, [..., S]) and the queries sit at slots `query_offset + t`.
  """
  xp = _array_module(segment_ids)
  if key_segment_ids is None:
    key_segment_ids, key_image_ids = segment_ids, image_ids
  seg_q, seg_k = segment_ids[..., :, None], key_segment_ids[..., None, :]
  q_index = query_offset + xp.arange(segment_ids.shape[-1])
  k_index = xp.arange(key_segment_ids.shape[-1])
  allowed = k_index[None, :] <= q_index[:, None]
  if bidirectional_images:
    img_q, img_k = image_ids[..., :, None], key_image_ids[..., None, :]
    allowed = allowed | ((img_q == img_k) & (img_q != 0))
  return (seg_q == seg_k) & (seg_q != 0) & allowed


def _array_module(x):
  if isinstance(x, np.ndarray):
    return np
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp


def check_row(row: dict, *, boi: int, eoi: int, img: int) -> None:
  """Asserts the invariants of one packed row (no batch axis); raises AssertionError.

  Used by tests and by `--mode=inspect`; cheap enough to run on samples.
  """
  seg, pos, iid = row["segment_ids"], row["positions"], row["image_ids"]
  tok, lw = row["tokens"], row["loss_weights"]
  length = seg.shape[0]
  assert np.all(np.diff(seg[seg > 0]) >= 0), "segments out of order"
  padding = np.nonzero(seg == 0)[0]
  assert len(padding) == 0 or np.all(seg[padding[0]:] == 0), "padding inside the row"
  for s in np.unique(seg[seg > 0]):
    where = np.nonzero(seg == s)[0]
    assert np.array_equal(where, np.arange(where[0], where[-1] + 1)), f"segment {s} not contiguous"
    assert np.array_equal(pos[where], np.arange(len(where))), f"positions of segment {s} do not restart at 0"
    assert lw[where[-1]] == 0, f"segment {s}'s last token predicts the next document"
  assert np.all(lw[seg == 0] == 0), "loss weight on padding"
  num_images = int(row["image_valid"].sum())
  assert np.all(row["image_valid"][:num_images]) and not np.any(row["image_valid"][num_images:]), \
      "valid images not first"
  for k in range(1, num_images + 1):
    where = np.nonzero(iid == k)[0]
    assert len(where) > 0, f"image {k} has no slots"
    first, last = where[0], where[-1]
    assert np.array_equal(where, np.arange(first, last + 1)), f"image {k}'s slots not contiguous"
    assert first > 0 and tok[first - 1] == boi, f"image {k} not after BOI"
    assert last + 1 < length and tok[last + 1] == eoi, f"image {k} not before EOI"
    assert np.all(tok[where] == img), f"image {k}'s slots hold text tokens"
    assert len(np.unique(seg[first - 1:last + 2])) == 1, f"image {k} crosses documents"
    assert row["image_t_max"][k - 1] > 0, f"image {k} has no noise limit"
  assert iid.max(initial=0) == num_images, "image ids and image_valid disagree"
  assert not np.any(row["images"][num_images:]), "unused image slots are not zero"
  assert not np.any(row["image_written"][num_images:]), "an unused image slot is marked written"
