"""Reading and writing `*.safetensors` checkpoints tensor by tensor, without torch.

The format: 8 bytes little-endian header length N, N bytes of JSON (`{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}`), then the raw little-endian data, offsets relative
to the end of the header. We parse it ourselves rather than through `safetensors.numpy` because that API
cannot return bfloat16 — the dtype released checkpoints use; here a BF16 tensor is the raw bytes viewed as
`ml_dtypes.bfloat16` (what `jnp.bfloat16` is). Each tensor is read on its own: reading a checkpoint holds
one tensor at a time in memory, however large the file.

A sharded checkpoint is a directory with `model.safetensors.index.json` (`{"weight_map": {name: file}}`);
`CheckpointReader` reads either layout.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

DTYPES = {
  "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
  "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PREFERRED_FILES = (SINGLE_FILE, "diffusion_pytorch_model.safetensors")
_MAX_HEADER = 100 * 2 ** 20  # the format's own limit: a larger "header" means a damaged or foreign file


def read_header(path: str) -> tuple[dict, int]:
  """({name: entry}, byte offset of the data) of one .safetensors file."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (length,) = struct.unpack("<Q", raw)
    if length > _MAX_HEADER:
      raise ValueError(f"{path}: header length {length} bytes; not a safetensors file or damaged")
    header = json.loads(f.read(length))
  header.pop("__metadata__", None)
  return header, 8 + length


class SafetensorsFile:
  """One .safetensors file: its tensor names, shapes and dtypes, and each tensor read on demand."""

  def __init__(self, path: str):
    self.path = path
    self.header, self._data_start = read_header(path)

  def keys(self) -> list[str]:
    return list(self.header)

  def dtype(self, name: str) -> np.dtype:
    code = self.header[name]["dtype"]
    if code not in DTYPES:
      raise ValueError(f"{self.path}: tensor {name!r} has dtype {code}, which unimm does not read "
                       f"(known: {sorted(DTYPES)})")
    return DTYPES[code]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    """The tensor, read from the file into memory of its own (a read, not a memory map: the pages of a
    mapped multi-GB file would count as the process's memory until the kernel reclaims them)."""
    entry = self.header[name]
    begin, end = entry["data_offsets"]
    dtype, shape = self.dtype(name), tuple(entry["shape"])
    size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if end - begin != size:
      raise ValueError(f"{self.path}: tensor {name!r} spans {end - begin} bytes, but {shape} of {dtype} needs {size}")
    raw = np.empty(size, np.uint8)
    with open(self.path, "rb") as f:
      f.seek(self._data_start + begin)
      if f.readinto(memoryview(raw)) != size:
        raise ValueError(f"{self.path}: tensor {name!r} ends past the end of the file (truncated?)")
    return raw.view(dtype.newbyteorder("<")).reshape(shape)


class CheckpointReader:
  """The tensors of a Hugging Face model directory: one `model.safetensors` (or any single `*.safetensors`)
  or a sharded set with its index; or a single file's path."""

  def __init__(self, path: str):
    if os.path.isfile(path):
      files = {path: None}
      self.weight_map = {name: path for name in SafetensorsFile(path).keys()}
    else:
      indexes = sorted(n for n in os.listdir(path) if n.endswith(".safetensors.index.json"))
      index = os.path.join(path, INDEX_FILE if INDEX_FILE in indexes else (indexes or [INDEX_FILE])[0])
      if os.path.exists(index):  # model.safetensors.index.json, diffusion_pytorch_model.safetensors.index.json
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
        self.weight_map = {name: os.path.join(path, file) for name, file in weight_map.items()}
      else:
        found = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        if not found:
          raise FileNotFoundError(f"{path}: no *.safetensors (and no {INDEX_FILE}); unimm reads "
                                  "safetensors checkpoints only (convert .bin files with transformers first)")
        # the main weights before variants (diffusers ships e.g. diffusion_pytorch_model.fp16.safetensors beside)
        preferred = [n for n in PREFERRED_FILES if n in found]
        plain = [n for n in found if n.count(".") == 1]
        if not preferred and len(plain) != 1:
          raise FileNotFoundError(f"{path}: several .safetensors files {found}, no index and none of {PREFERRED_FILES}")
        single = os.path.join(path, (preferred or plain)[0])
        self.weight_map = {name: single for name in SafetensorsFile(single).keys()}
      files = dict.fromkeys(self.weight_map.values())
    self._files = {p: SafetensorsFile(p) for p in files}

  def keys(self) -> list[str]:
    return list(self.weight_map)

  def __contains__(self, name: str) -> bool:
    return name in self.weight_map

  def _file(self, name: str) -> SafetensorsFile:
    if name not in self.weight_map:
      raise KeyError(name)
    return self._files[self.weight_map[name]]

  def shape(self, name: str) -> tuple[int, ...]:
    return self._file(name).shape(name)

  def dtype(self, name: str) -> np.dtype:
    return self._file(name).dtype(name)

  def get(self, name: str) -> np.ndarray:
    return self._file(name).get(name)


def _entry_bytes(array: np.ndarray) -> int:
  return array.dtype.itemsize * int(np.prod(array.shape, dtype=np.int64))


def write_file(path: str, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict | None = None) -> int:
  """Writes (name, array) pairs as one .safetensors file; returns its size in bytes. The pairs are iterated
  twice (header, then data): pass a list, or arrays that are cheap to produce again."""
  tensors = list(tensors)
  header, offset = {}, 0
  for name, array in tensors:
    if array.dtype not in NAMES:
      raise ValueError(f"tensor {name!r}: dtype {array.dtype} has no safetensors name")
    size = _entry_bytes(array)
    header[name] = {"dtype": NAMES[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + size]}
    offset += size
  if metadata:
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the reference writer does
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for _, array in tensors:
      f.write(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
  os.replace(tmp, path)
  return 8 + len(blob) + offset


def write_sharded(directory: str, tensors: Iterator[tuple[str, np.ndarray]], max_shard_bytes: int = 5 * 2 ** 30,
                  metadata: dict | None = None) -> list[str]:
  """Writes a stream of (name, array) into `model-0000i-of-0000n.safetensors` files of at most
  `max_shard_bytes` (one file named `model.safetensors` when they all fit) with the index. Holds one tensor
  at a time: each goes to a shard's data file as it comes, and the shard is assembled (header, then the
  data copied in blocks) once it is full. Returns the files written."""
  os.makedirs(directory, exist_ok=True)
  stale = [n for n in os.listdir(directory) if n.endswith(".safetensors") or n.endswith(".safetensors.index.json")]
  if stale:  # old shards or an old index beside new weights: a reader would take the wrong ones
    raise FileExistsError(f"{directory} already holds {stale[:3]}: export into an empty directory")
  shards = []  # (temporary final name, header entries, data file)
  header, offset, data = {}, 0, None

  def flush():
    nonlocal header, offset, data
    if data is None:
      return
    data.close()
    name = os.path.join(directory, f"shard-{len(shards):05d}.tmp.safetensors")
    _assemble(name, header, data.name, {"format": "pt", **(metadata or {})})
    shards.append((name, list(header)))
    header, offset, data = {}, 0, None

  for name, array in tensors:
    size = _entry_bytes(array)
    if header and offset + size > max_shard_bytes:
      flush()
    if data is None:
      data = open(os.path.join(directory, f"shard-{len(shards):05d}.data.tmp"), "wb")
    if array.dtype not in NAMES:
      raise ValueError(f"tensor {name!r}: dtype {array.dtype} has no safetensors name")
    header[name] = {"dtype": NAMES[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + size]}
    data.write(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    offset += size
  flush()
  if len(shards) == 1:
    os.replace(shards[0][0], os.path.join(directory, SINGLE_FILE))
    return [SINGLE_FILE]
  weight_map, files = {}, []
  for i, (tmp_name, names) in enumerate(shards):
    final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    os.replace(tmp_name, os.path.join(directory, final))
    weight_map.update(dict.fromkeys(names, final))
    files.append(final)
  total = sum(os.path.getsize(os.path.join(directory, f)) for f in files)
  with open(os.path.join(directory, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return files


def _assemble(path: str, header: dict, data_path: str, metadata: dict) -> None:
  """A .safetensors file from its header entries and a file holding its data; removes the data file."""
  blob = json.dumps({**header, "__metadata__": {k: str(v) for k, v in metadata.items()}},
                    separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as out, open(data_path, "rb") as data:
    out.write(struct.pack("<Q", len(blob)))
    out.write(blob)
    shutil.copyfileobj(data, out, 64 * 2 ** 20)
  os.remove(data_path)
