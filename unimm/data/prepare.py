"""Convert your own interleaved documents into ArrayRecord shards unimm reads.

    python -m unimm.data.prepare --inputs='corpus/*.jsonl' --output_dir=out/train \\
        --image_size=256 --channels=3 --workers=8
    unimm-prepare ...                                   # the same, as a console script

Inputs are JSON lines or Parquet files, one document per line / row:

* JSON lines: ``{"parts": [{"text": "..."}, {"image": "img/cat.png"},
  {"image_base64": "..."}, {"text": "...", "loss_weight": 0}], "pair": false}``;
  image paths are relative to the input file.
* Parquet: a ``parts`` column of ``list<struct<text: string, image: binary,
  image_path: string, loss_weight: float>>`` (unset fields null) and an optional
  ``pair`` bool column.

``pair: true`` marks an image–caption pair (the layout then picks the order and
may drop the caption). ``loss_weight: 0`` masks a text part as a prompt.

Each input file becomes one output shard ``<stem>.array_record`` (so shard
count and parallelism follow the input files), written by a pool of worker
processes while streaming: nothing is held whole in memory. Several hosts split
the files with ``--host_index=i --host_count=n`` (host i takes files i, i+n, …). Images are decoded,
converted to the channel count, centre-cropped and resized to ``image_size``
when given, and stored as PNG. A document that cannot be converted is skipped
and counted by reason; ``<stem>.stats.json`` per shard and ``stats.json`` in the
output directory hold the counts.
"""

from __future__ import annotations

import base64
import collections
import glob
import io
import json
import multiprocessing
import os
from typing import Iterator

from absl import app, flags, logging
import numpy as np
from PIL import Image as PILImage

from unimm.data import documents, records

_INPUTS = flags.DEFINE_list("inputs", None, "Input files or globs (.jsonl, .json, .parquet).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the shards go.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "Square output size in pixels; 0 keeps the size.")
_CHANNELS = flags.DEFINE_enum("channels", "3", ["1", "3"], "Image channels to store (1 = grayscale).")
_WORKERS = flags.DEFINE_integer("workers", 0, "Worker processes; 0 = one per core.")
_HOST_INDEX = flags.DEFINE_integer("host_index", 0, "This host's index when several hosts split the inputs.")
_HOST_COUNT = flags.DEFINE_integer("host_count", 1, "How many hosts split the inputs (files i::count each).")


def iter_documents(path: str) -> Iterator[tuple[list[dict] | None, bool, str]]:
  """Streams (parts, is_pair, error) from one input file; parts None on a bad line."""
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=256):
      for row in batch.to_pylist():
        yield row.get("parts"), bool(row.get("pair") or False), ""
    return
  with open(path, "rb") as f:
    for line in f:
      if not line.strip():
        continue
      try:
        obj = json.loads(line.decode("utf-8"))
      except UnicodeDecodeError as e:
        yield None, False, f"{documents.BAD_TEXT}: {e}"
        continue
      except json.JSONDecodeError as e:
        yield None, False, f"{documents.CORRUPT}: {e}"
        continue
      if not isinstance(obj, dict):
        yield None, False, f"{documents.CORRUPT}: line is not an object"
        continue
      yield obj.get("parts"), bool(obj.get("pair", False)), ""


def convert_image(data: bytes, image_size: int, channels: int) -> bytes:
  """PNG bytes of an encoded image, converted and centre-cropped/resized to `image_size`."""
  try:
    with PILImage.open(io.BytesIO(data)) as im:
      im = im.convert("L" if channels == 1 else "RGB")
      if image_size:
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
        if side != image_size:
          im = im.resize((image_size, image_size), PILImage.Resampling.BICUBIC)
      pixels = np.asarray(im, np.uint8)
  except Exception as e:
    raise documents.BadRecord(documents.BAD_IMAGE, str(e)) from e
  return records.encode_image(pixels[..., None] if pixels.ndim == 2 else pixels)


def _image_bytes(part: dict, base_dir: str) -> bytes:
  if part.get("image") is not None and isinstance(part["image"], (bytes, bytearray)):
    return bytes(part["image"])
  if part.get("image_base64"):
    return base64.b64decode(part["image_base64"])
  path = part.get("image_path") or part.get("image")
  if not isinstance(path, str) or not path:
    raise documents.BadRecord(documents.CORRUPT, f"image part without data: {sorted(part)}")
  full = path if os.path.isabs(path) else os.path.join(base_dir, path)
  try:
    with open(full, "rb") as f:
      return f.read()
  except OSError as e:
    raise documents.BadRecord(documents.BAD_IMAGE, f"cannot read {full}: {e}") from e


def convert_document(parts, is_pair: bool, base_dir: str, image_size: int, channels: int) -> bytes:
  """One input document as a record; raises BadRecord with the skip reason."""
  if not isinstance(parts, list):
    raise documents.BadRecord(documents.CORRUPT, "'parts' is not a list")
  out = []
  for part in parts:
    if not isinstance(part, dict):
      raise documents.BadRecord(documents.CORRUPT, f"part is a {type(part).__name__}")
    if part.get("text") is not None:
      text = part["text"]
      if isinstance(text, bytes):
        text = documents.decode_text(text)
      if not isinstance(text, str):
        raise documents.BadRecord(documents.CORRUPT, f"text is a {type(text).__name__}")
      if text:
        weight = part.get("loss_weight")
        out.append({"text": text, "loss_weight": 1.0 if weight is None else float(weight)})
    elif any(part.get(k) is not None for k in ("image", "image_path", "image_base64")):
      out.append({"image": convert_image(_image_bytes(part, base_dir), image_size, channels)})
    else:
      raise documents.BadRecord(documents.CORRUPT, f"part with neither text nor image: {sorted(part)}")
  if not out:
    raise documents.BadRecord(documents.EMPTY, "no text and no image")
  if is_pair and sum("image" in p for p in out) != 1:
    raise documents.BadRecord(documents.CORRUPT, "a pair needs exactly one image")
  return records.encode_document(out, is_pair)


def convert_file(args: tuple[str, str, int, int]) -> dict:
  """Converts one input file into `<output_dir>/<stem>.array_record`; returns its counts."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  path, output_dir, image_size, channels = args
  stem = os.path.basename(path).rsplit(".", 1)[0]
  out_path = os.path.join(output_dir, stem + ".array_record")
  counts = collections.Counter()
  base_dir = os.path.dirname(os.path.abspath(path))
  tmp = out_path + ".incomplete"
  writer = ArrayRecordWriter(tmp, "group_size:1")  # group 1: cheap random access for shuffling
  try:
    for parts, is_pair, error in iter_documents(path):
      if error:
        counts[error.split(":", 1)[0]] += 1
        continue
      try:
        writer.write(convert_document(parts, is_pair, base_dir, image_size, channels))
        counts["written"] += 1
      except documents.BadRecord as e:
        counts[e.reason] += 1
  finally:
    writer.close()
  os.replace(tmp, out_path)  # a shard exists only once complete
  stats = {"input": path, "output": out_path, **counts}
  with open(os.path.join(output_dir, stem + ".stats.json"), "w") as f:
    json.dump(stats, f)
  return stats


def prepare(inputs: list[str], output_dir: str, *, image_size: int = 0, channels: int = 3,
            workers: int = 0, host_index: int = 0, host_count: int = 1) -> dict:
  """Converts this host's share of the input files (in parallel); returns the summed counts."""
  paths = sorted({p for pattern in inputs for p in glob.glob(pattern)})
  if not paths:
    raise FileNotFoundError(f"no input files match {inputs}")
  if not 0 <= host_index < host_count:
    raise ValueError(f"host_index={host_index} must lie in [0, host_count={host_count})")
  stems = [os.path.basename(p).rsplit(".", 1)[0] for p in paths]
  dupes = [s for s, n in collections.Counter(stems).items() if n > 1]
  if dupes:
    raise ValueError(f"input files share the names {dupes}; each becomes <name>.array_record, rename them")
  os.makedirs(output_dir, exist_ok=True)
  jobs = [(p, output_dir, image_size, channels) for p in paths[host_index::host_count]]
  if not jobs:
    return {"files": 0}
  workers = min(len(jobs), workers or os.cpu_count() or 1)
  if workers > 1:
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      per_file = list(pool.imap_unordered(convert_file, jobs))
  else:
    per_file = [convert_file(j) for j in jobs]
  total = collections.Counter()
  for stats in per_file:
    total.update({k: v for k, v in stats.items() if isinstance(v, int)})
  summary = {"files": len(per_file), **dict(sorted(total.items()))}
  name = "stats.json" if host_count == 1 else f"stats-{host_index:05d}-of-{host_count:05d}.json"
  with open(os.path.join(output_dir, name), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def main(argv):
  del argv
  if not _INPUTS.value or not _OUTPUT_DIR.value:
    raise app.UsageError("--inputs and --output_dir are required")
  summary = prepare(_INPUTS.value, _OUTPUT_DIR.value, image_size=_IMAGE_SIZE.value,
                    channels=int(_CHANNELS.value), workers=_WORKERS.value, host_index=_HOST_INDEX.value,
                    host_count=_HOST_COUNT.value)
  logging.info("prepared: %s", summary)
  print(json.dumps(summary))


def run():
  app.run(main)


if __name__ == "__main__":
  run()
