"""Data sources: from a config entry to a random-access dataset of `Document`s.

A source entry (`config.data.sources.<name>`) has a `kind`:

* ``tfds``: a TFDS dataset written as ArrayRecord, read with `tfds.data_source`
  (the embedded `shapes` and `digits`, or any dataset on a bucket). Records are
  image–caption pairs: ``text_key`` (default ``caption``) and ``image_key``
  (default ``image``); a record without an image is a text-only document.
* ``prepared``: ArrayRecord files written by `unimm.data.prepare`; ``path`` is a
  glob and may contain ``{split}``.

Every record becomes a `Document`, or a `Skipped` marker when it cannot.
"""

from __future__ import annotations

import glob
import shutil
from typing import Any, Callable

from absl import logging
import grain
import numpy as np
import tensorflow_datasets as tfds

from unimm.data import digits, documents, records, shapes

EMBEDDED = {"shapes": shapes.Shapes, "digits": digits.Digits}


def _tfds_name(spec) -> str:
  name = spec.get("tfds_name", "")
  builder_config = spec.get("builder_config", "")
  return f"{name}/{builder_config}" if builder_config else name


def prepare_embedded(spec, data_dir: str) -> None:
  """Writes an embedded dataset (ArrayRecord) under `data_dir` unless it is there already."""
  name = spec.get("tfds_name", "")
  if name not in EMBEDDED:
    return
  builder = EMBEDDED[name](data_dir=data_dir, config=spec.get("builder_config") or None,
                           file_format="array_record")
  if not builder.data_path.exists():
    logging.info("Writing the embedded dataset %s to %s (once).", _tfds_name(spec), builder.data_dir)
  try:
    builder.download_and_prepare()
  except FileExistsError:
    # Another run on this machine wrote the same deterministic dataset first (TFDS renames its temporary
    # directory into place last, so the one there is complete): use theirs, drop ours.
    if not builder.data_path.exists():
      raise
    logging.info("The embedded dataset %s was written by another run meanwhile; using it.", _tfds_name(spec))
    for leftover in builder.data_path.parent.glob(f"incomplete.*{builder.data_path.name}"):
      shutil.rmtree(leftover, ignore_errors=True)


class _RobustSource:
  """Wraps a random-access source so a record that fails to read becomes a `Skipped`."""

  def __init__(self, source, decode: Callable[[Any], documents.Document]):
    self._source = source
    self._decode = decode

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    try:
      return self._decode(self._source[index])
    except documents.BadRecord as e:
      return documents.Skipped(e.reason, e.detail)
    except Exception as e:  # a record the storage layer cannot parse
      return documents.Skipped(documents.CORRUPT, f"{type(e).__name__}: {e}")


class _PairDecoder:
  """A TFDS example → `Document` (a class, not a closure, so grain workers can pickle it)."""

  def __init__(self, text_key: str, image_key: str):
    self.text_key, self.image_key = text_key, image_key

  def __call__(self, example: dict) -> documents.Document:
    parts: list[documents.Part] = [documents.Text(documents.decode_text(example[self.text_key]))]
    if self.image_key in example:
      pixels = np.asarray(example[self.image_key])
      if pixels.ndim == 2:
        pixels = pixels[..., None]
      parts.append(documents.Image(pixels))
    return documents.Document(tuple(parts), is_pair=len(parts) == 2)


def open_source(spec, split: str, data_dir: str) -> grain.MapDataset:
  """A MapDataset of `Document | Skipped` for one source entry and split."""
  kind = spec.get("kind", "")
  if kind == "tfds":
    name = _tfds_name(spec)
    try:
      source = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:
      hint = (" Run `python -m unimm.main --mode=prepare --config=...` first."
              if spec.get("tfds_name") in EMBEDDED else "")
      raise FileNotFoundError(f"TFDS dataset {name!r} split {split!r} not found under {data_dir!r}.{hint} ({e})") from e
    decode = _PairDecoder(spec.get("text_key", "caption"), spec.get("image_key", "image"))
  elif kind == "prepared":
    pattern = spec.get("path", "").replace("{split}", split)
    paths = sorted(glob.glob(pattern))
    if not paths:
      raise FileNotFoundError(f"No ArrayRecord files match {pattern!r} (source path {spec.get('path')!r}).")
    source = grain.sources.ArrayRecordDataSource(paths)
    decode = records.decode_document
  else:
    raise ValueError(f"Unknown source kind {kind!r}; expected 'tfds' or 'prepared'.")
  return grain.MapDataset.source(_RobustSource(source, decode))


def iter_texts(spec, split: str, data_dir: str, limit: int):
  """Up to `limit` text parts of a source (to train a tokenizer on)."""
  ds = open_source(spec, split, data_dir)
  count = 0
  for i in range(len(ds)):
    doc = ds[i]
    if isinstance(doc, documents.Skipped):
      continue
    for part in doc.parts:
      if isinstance(part, documents.Text) and part.text:
        yield part.text
        count += 1
        if count >= limit:
          return
