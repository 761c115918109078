"""Prompts for generation: documents' parts → token rows with clean image slots.

A prompt is laid out like training data: `BOS`, text tokens, and for each image
`BOI <slots> EOI`; its images enter clean (timestep 0), as when a model reads
an image it was given. Batches are left-padded (padding has segment 0, which
the attention rule ignores) so every row ends at the same slot.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from unimm.data import documents


@dataclasses.dataclass(frozen=True)
class Prompt:
  tokens: list[int]
  image_ids: list[int]  # per token: 0 for text, k for the prompt's k-th image
  images: list[np.ndarray]  # uint8 [H, W, C] each

  def __len__(self):
    return len(self.tokens)


def encode(parts, tokenizer, slots: int, *, bos: bool = True) -> Prompt:
  """A `Prompt` from `documents.Text` / `documents.Image` parts."""
  s = tokenizer.specials
  tokens = [s.bos] if bos else []
  image_ids = [0] * len(tokens)
  images = []
  for part in parts:
    if isinstance(part, documents.Text):
      ids = tokenizer.encode(part.text)
      tokens += ids
      image_ids += [0] * len(ids)
    elif isinstance(part, documents.Image):
      images.append(part.pixels)
      tokens += [s.boi] + [s.img] * slots + [s.eoi]
      image_ids += [0] + [len(images)] * slots + [0]
    else:
      raise TypeError(f"a prompt part is Text or Image, got {type(part).__name__}")
  return Prompt(tokens, image_ids, images)


def batch(prompts: list[Prompt], *, pad_id: int, max_images: int, image_shape, multiple: int = 16) -> dict:
  """Left-padded numpy arrays: tokens, positions, segment_ids, image_ids [B, L]; images [B, M, H, W, C]."""
  longest = max(len(p) for p in prompts)
  length = -(-longest // multiple) * multiple
  b = len(prompts)
  out = {
      "tokens": np.full((b, length), pad_id, np.int32),
      "positions": np.zeros((b, length), np.int32),
      "segment_ids": np.zeros((b, length), np.int32),
      "image_ids": np.zeros((b, length), np.int32),
      "images": np.zeros((b, max_images, *image_shape), np.uint8),
  }
  for i, p in enumerate(prompts):
    if len(p.images) > max_images:
      raise ValueError(f"prompt {i} has {len(p.images)} images; the model takes {max_images} per row")
    start = length - len(p)
    out["tokens"][i, start:] = p.tokens
    out["positions"][i, start:] = np.arange(len(p))
    out["segment_ids"][i, start:] = 1
    out["image_ids"][i, start:] = p.image_ids
    for k, im in enumerate(p.images):
      out["images"][i, k] = im
  return out
