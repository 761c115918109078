"""The one in-memory form of a training document, and how bad input is reported.

Every source (image–caption pairs, VQA, interleaved web documents, plain text)
produces `Document`s: an ordered tuple of parts, each `Text` or `Image`. A record
that cannot become a valid document becomes a `Skipped` marker instead; the
packer drops markers and counts them by reason, so bad input loses nothing else
and the counts reach the training metrics.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import numpy as np

# Reasons a record is skipped (the keys of the `stats` counters of a batch).
CORRUPT = "corrupt"  # the record does not decode
EMPTY = "empty"  # no text and no image
BAD_IMAGE = "bad_image"  # undecodable image, wrong size or wrong channel count
BAD_TEXT = "bad_text"  # text that is not valid UTF-8
TOO_LONG = "too_long"  # cannot be split to fit a row (an image longer than the row; any too-long document
# when data.split_long_documents is False)
TOO_MANY_IMAGES = "too_many_images"  # an image where rows hold none (more than a row holds, unsplit)
SKIP_REASONS = (CORRUPT, EMPTY, BAD_IMAGE, BAD_TEXT, TOO_LONG, TOO_MANY_IMAGES)


@dataclasses.dataclass(frozen=True)
class Text:
  """A text part; `loss_weight` 0 masks it as a prompt (e.g. a VQA question). `as_padding`: laid out
  as PAD tokens of the text's length (a caption dropped for classifier-free guidance, Janus-style)."""

  text: str
  loss_weight: float = 1.0
  as_padding: bool = False


@dataclasses.dataclass(frozen=True)
class Image:
  """An image part: uint8 [H, W, C]. `read_pixels`: the same picture as the model reads it when that
  differs from how it writes it (Janus: letterboxed for understanding, centre-cropped for generation;
  `prepare --image_fit=per_role`); the layout picks by the image's role."""

  pixels: np.ndarray
  read_pixels: np.ndarray | None = None

  def as_read(self) -> np.ndarray:
    return self.pixels if self.read_pixels is None else self.read_pixels


Part = Union[Text, Image]


@dataclasses.dataclass(frozen=True)
class Document:
  """An ordered list of parts.

  `is_pair` marks an image–caption pair (one text, one image): the layout then
  chooses the order (caption first → text-to-image, image first → captioning)
  and may drop the caption for classifier-free guidance. Other documents keep
  their order. `caption_first_prob` overrides the layout's probability for this
  pair (a source that is all understanding or all generation data).
  """

  parts: tuple[Part, ...]
  is_pair: bool = False
  caption_first_prob: float | None = None

  @property
  def images(self) -> list[np.ndarray]:
    return [p.pixels for p in self.parts if isinstance(p, Image)]


@dataclasses.dataclass(frozen=True)
class Skipped:
  """Stands in for a record that could not become a valid document."""

  reason: str
  detail: str = ""


def decode_text(raw: bytes | str) -> str:
  """UTF-8 text from bytes; raises `BadRecord(BAD_TEXT)` when it is not UTF-8."""
  if isinstance(raw, str):
    return raw
  try:
    return bytes(raw).decode("utf-8")
  except UnicodeDecodeError as e:
    raise BadRecord(BAD_TEXT, str(e)) from e


class BadRecord(Exception):
  """Raised while decoding a record; carries the skip reason."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


def check_document(doc: Document, image_shape: tuple[int, int, int]) -> Document | Skipped:
  """The document if it is usable with images of `image_shape` (H, W, C), else why not."""
  has_content = False
  for part in doc.parts:
    if isinstance(part, Text):
      has_content |= bool(part.text)
    elif isinstance(part, Image):
      for px in (part.pixels, part.as_read()):
        if px.dtype != np.uint8 or px.shape != tuple(image_shape):
          return Skipped(BAD_IMAGE, f"image {px.dtype}{list(px.shape)}, expected uint8{list(image_shape)}")
      has_content = True
    else:
      return Skipped(CORRUPT, f"unknown part {type(part).__name__}")
  if not has_content:
    return Skipped(EMPTY)
  if doc.is_pair and len(doc.images) != 1:
    return Skipped(CORRUPT, f"an image-caption pair needs one image, got {len(doc.images)}")
  return doc
