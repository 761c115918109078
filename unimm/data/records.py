"""The on-disk record of a prepared document (what `unimm.data.prepare` writes).

One ArrayRecord record per document, msgpack-encoded:
``{"v": 1, "pair": bool, "parts": [{"text": str, "w": float} | {"image": <PNG bytes>[, "read": <PNG
bytes>]}]}`` (`read`: the image as the model reads it, when prepared per role).
Images are stored encoded (compact, decoded by the reader's workers); text as
UTF-8. `decode_document` raises `BadRecord` with the skip reason on bad input.
"""

from __future__ import annotations

import io

import msgpack
import numpy as np
from PIL import Image as PILImage

from unimm.data import documents

FORMAT_VERSION = 1


def encode_image(pixels: np.ndarray) -> bytes:
  """PNG bytes of uint8 [H, W, C] pixels (C = 1 or 3)."""
  pixels = np.asarray(pixels)
  if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] not in (1, 3):
    raise ValueError(f"expected uint8 [H, W, 1|3] pixels, got {pixels.dtype}{list(pixels.shape)}")
  buf = io.BytesIO()
  PILImage.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buf, format="PNG")
  return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
  """uint8 [H, W, C] pixels from encoded bytes, C = 1 for grayscale, 3 otherwise."""
  try:
    with PILImage.open(io.BytesIO(data)) as im:
      im.load()
      if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")
      pixels = np.asarray(im, np.uint8)
  except Exception as e:  # PIL raises many kinds on bad bytes
    raise documents.BadRecord(documents.BAD_IMAGE, f"undecodable image: {e}") from e
  return pixels[..., None] if pixels.ndim == 2 else pixels


def encode_document(parts: list[dict], is_pair: bool = False) -> bytes:
  """A record from parts `{"text": str, "loss_weight"?: float}` / `{"image": encoded bytes}`."""
  out = []
  for part in parts:
    if "text" in part:
      out.append({"text": part["text"], "w": float(part.get("loss_weight", 1.0))})
    elif "image" in part:
      out.append({"image": bytes(part["image"])})
      if part.get("image_read") is not None:
        out[-1]["read"] = bytes(part["image_read"])
    else:
      raise ValueError(f"a part needs 'text' or 'image', got keys {sorted(part)}")
  return msgpack.packb({"v": FORMAT_VERSION, "pair": bool(is_pair), "parts": out}, use_bin_type=True)


def decode_document(record: bytes) -> documents.Document:
  """The `Document` in a record; raises `BadRecord` (corrupt, bad_text, bad_image)."""
  try:
    # raw=True keeps text as bytes so invalid UTF-8 is reported as bad_text, not corrupt.
    obj = msgpack.unpackb(record, raw=True)
    version, is_pair, raw_parts = obj[b"v"], obj[b"pair"], obj[b"parts"]
  except documents.BadRecord:
    raise
  except Exception as e:
    raise documents.BadRecord(documents.CORRUPT, f"undecodable record: {e}") from e
  if version != FORMAT_VERSION:
    raise documents.BadRecord(documents.CORRUPT, f"record format v{version}, reader knows v{FORMAT_VERSION}")
  parts = []
  for raw in raw_parts:
    if not isinstance(raw, dict):
      raise documents.BadRecord(documents.CORRUPT, f"part is a {type(raw).__name__}")
    if b"text" in raw:
      parts.append(documents.Text(documents.decode_text(raw[b"text"]), float(raw.get(b"w", 1.0))))
    elif b"image" in raw:
      read = decode_image(raw[b"read"]) if raw.get(b"read") is not None else None
      parts.append(documents.Image(decode_image(raw[b"image"]), read))
    else:
      raise documents.BadRecord(documents.CORRUPT, f"part with keys {sorted(raw)}")
  return documents.Document(tuple(parts), is_pair=bool(is_pair))
