"""Prompts for generation: documents' parts → token rows with clean image slots.

A prompt is laid out like training data: `BOS`, text tokens, and for each image
`BOI <slots> EOI`; its images enter clean (timestep 0), as when a model reads
an image it was given. Batches are left-padded (padding has segment 0, which
the attention rule ignores) so every row ends at the same slot.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from unimm.data import documents, layout, packed


@dataclasses.dataclass(frozen=True)
class Prompt:
  tokens: list[int]
  image_ids: list[int]  # per token: 0 for text, k for the prompt's k-th image
  images: list[np.ndarray]  # uint8 [H, W, C] each

  def __len__(self):
    return len(self.tokens)


def encode(parts, tokenizer, slots: int, *, bos: bool = True) -> Prompt:
  """A `Prompt` from `documents.Text` / `documents.Image` parts."""
  token_parts, images = [], []
  for part in parts:
    if isinstance(part, documents.Text):
      token_parts.append(tokenizer.encode(part.text))
    elif isinstance(part, documents.Image):
      images.append(part.pixels)
      token_parts.append(layout.IMAGE)
    else:
      raise TypeError(f"a prompt part is Text or Image, got {type(part).__name__}")
  tokens, image_ids = layout.lay_out(token_parts, tokenizer.specials, slots, bos=bos)
  return Prompt(tokens, image_ids, images)


def batch(prompts: list[Prompt], *, pad_id: int, max_images: int, image_shape,
          multiple: int = 16) -> tuple[packed.Rows, np.ndarray]:
  """The prompts left-padded to a multiple of `multiple` slots (numpy `Rows`), and their images
  uint8 [B, M, H, W, C]."""
  longest = max(len(p) for p in prompts)
  length = -(-longest // multiple) * multiple
  images = np.zeros((len(prompts), max_images, *image_shape), np.uint8)
  for i, p in enumerate(prompts):
    if len(p.images) > max_images:
      raise ValueError(f"prompt {i} has {len(p.images)} images; the model takes {max_images} per row")
    for k, im in enumerate(p.images):
      images[i, k] = im
  rows = packed.Rows.padded([(p.tokens, p.image_ids) for p in prompts], length, pad_id, left=True)
  return rows, images
