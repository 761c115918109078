"""Taming-transformers VQGANs as transformers ships them (Chameleon's `model.vqmodel`, Janus's
`model.vqmodel`) ⇄ unimm's VQ tokenizer (`unimm.models.vq.VQModel`, layout "taming").

| transformers (under the prefix)                      | unimm (`vq/`)                               |
|------------------------------------------------------|---------------------------------------------|
| {encoder,decoder}.conv_in, .norm_out, .conv_out      | {encoder,decoder}/stem, /out_norm, /out     |
| encoder.down.i.block.j.{norm1,conv1,norm2,conv2,nin_shortcut} | encoder/down{i}_{j}/{…, skip}      |
| encoder.down.i.attn.j.{norm,q,k,v,proj_out}          | encoder/down{i}_{j}_attn/{norm,q,k,v,proj}  |
| encoder.down.i.downsample.conv                       | encoder/downsample{i}                       |
| decoder.up.k.block.j / .attn.j / .upsample.conv      | decoder/up{L−1−k}_{j} / up{L−1−k}_{j}_attn / upsample{L−1−k} |
| {encoder,decoder}.mid.{block_1,attn_1,block_2}       | {encoder,decoder}/{mid,mid_attn,mid2}       |
| quant_conv, quantize.embedding, post_quant_conv      | quant_proj, quantizer/codebook, post_quant_proj |

transformers' decoder lists its levels lowest resolution first (`up.0` is level L−1); 1×1 convs
(attention's q/k/v/proj, the quant convs) are unimm dense layers.
"""

from __future__ import annotations

import re

import numpy as np

_RES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "skip"}
_ATTN = {"norm": "norm", "q": "q", "k": "k", "v": "v", "proj_out": "proj"}
_FIXED = {"conv_in": "stem", "norm_out": "out_norm", "conv_out": "out"}
_TOP = {"quant_conv": "quant_proj", "post_quant_conv": "post_quant_proj", "quantize.embedding": "quantizer"}
_MID = {"block_1": "mid", "attn_1": "mid_attn", "block_2": "mid2"}
_INVERSE = {name: {v: k for k, v in table.items()} for name, table in
            (("top", _TOP), ("fixed", _FIXED), ("mid", _MID), ("res", _RES), ("attn", _ATTN))}


def our_path(stem: str, levels: int) -> str | None:
  """The unimm module path of a transformers module path (the name without its prefix and leaf)."""
  if stem in _TOP:
    return _TOP[stem]
  part, _, rest = stem.partition(".")
  if part not in ("encoder", "decoder"):
    return None
  if rest in _FIXED:
    return f"{part}/{_FIXED[rest]}"
  m = re.fullmatch(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)", rest)
  if m and (m[1] == "down") == (part == "encoder"):
    level = int(m[2]) if m[1] == "down" else levels - 1 - int(m[2])
    table, suffix = (_RES, "") if m[3] == "block" else (_ATTN, "_attn")
    return f"{part}/{m[1]}{level}_{m[4]}{suffix}/{table[m[5]]}" if m[5] in table else None
  m = re.fullmatch(r"(down\.(\d+)\.downsample|up\.(\d+)\.upsample)\.conv", rest)
  if m and (m[2] is not None) == (part == "encoder"):
    return f"{part}/downsample{m[2]}" if m[2] is not None else f"{part}/upsample{levels - 1 - int(m[3])}"
  m = re.fullmatch(r"mid\.(block_1|attn_1|block_2)\.(\w+)", rest)
  if m:
    table = _ATTN if m[1] == "attn_1" else _RES
    return f"{part}/{_MID[m[1]]}/{table[m[2]]}" if m[2] in table else None
  return None


def _is_dense(path: str) -> bool:
  return "_attn/" in path or path.endswith("_proj")


def to_unimm(path: str, name: str, a: np.ndarray) -> tuple[str, np.ndarray]:
  """(leaf, value) of one tensor in unimm's layout."""
  if path == "quantizer":
    return "codebook", a
  if name.endswith("bias"):
    return "bias", a
  if a.ndim == 4 and _is_dense(path):
    return "kernel", a[:, :, 0, 0].T
  if a.ndim == 4:
    return "kernel", a.transpose(2, 3, 1, 0)
  return "scale", a


def import_params(reader, prefix: str, levels: int, *, parts=("encoder", "decoder")) -> dict:
  """The VQ tokenizer's params (float32 NumPy) under `prefix`; only the modules of `parts` (and the quant
  projections and codebook) are read. Tensors under the prefix unimm cannot place fail by name."""
  params: dict = {}
  unknown = []
  for name in reader.keys():
    if not name.startswith(prefix):
      continue
    stem = name[len(prefix):].rsplit(".", 1)[0]
    path = our_path(stem, levels)
    if path is None:
      unknown.append(name)
      continue
    if path.split("/")[0] in ("encoder", "decoder") and path.split("/")[0] not in parts:
      continue
    leaf, value = to_unimm(path, name, np.asarray(reader.get(name), np.float32))
    node = params
    for part in path.split("/"):
      node = node.setdefault(part, {})
    node[leaf] = value
  if unknown:
    raise ValueError(f"VQGAN tensors unimm does not map: {unknown[:5]} ({len(unknown)} in all)")
  if "quantizer" not in params:
    raise KeyError(f"no {prefix}quantize.embedding.weight in the checkpoint: not a VQGAN under {prefix!r}")
  return params


def _hf_stem(path: str, levels: int) -> str:
  """`our_path`'s inverse."""
  inv = _INVERSE
  if path in inv["top"]:
    return inv["top"][path]
  part, module, *rest = path.split("/")
  if module in inv["fixed"]:
    return f"{part}.{inv['fixed'][module]}"
  if module in inv["mid"]:
    leaf = inv["attn" if module == "mid_attn" else "res"][rest[0]]
    return f"{part}.mid.{inv['mid'][module]}.{leaf}"
  m = re.fullmatch(r"(down|up)(\d+)_(\d+)(_attn)?", module)
  if m:
    index = int(m[2]) if m[1] == "down" else levels - 1 - int(m[2])
    kind, leaf = ("attn", inv["attn"][rest[0]]) if m[4] else ("block", inv["res"][rest[0]])
    return f"{part}.{m[1]}.{index}.{kind}.{m[3]}.{leaf}"
  m = re.fullmatch(r"(downsample|upsample)(\d+)", module)
  if m:
    index = int(m[2]) if m[1] == "downsample" else levels - 1 - int(m[2])
    return f"{part}.{'down' if m[1] == 'downsample' else 'up'}.{index}.{m[1]}.conv"
  raise ValueError(f"unimm VQ param {path!r} has no transformers name")


def export_tensors(params: dict, prefix: str, levels: int):
  """(transformers name, float32 array) for every param of a taming-layout VQ tokenizer."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  for key, value in sorted(traverse_util.flatten_dict(params).items()):
    *modules, leaf = key
    a = np.asarray(value, np.float32)
    path = "/".join(modules)
    if leaf == "codebook":
      yield f"{prefix}quantize.embedding.weight", a
      continue
    name = f"{prefix}{_hf_stem(path, levels)}.{ {'scale': 'weight', 'kernel': 'weight', 'bias': 'bias'}[leaf]}"
    if leaf == "kernel" and _is_dense(path):
      a = a.T[:, :, None, None]
    elif leaf == "kernel":
      a = a.transpose(3, 2, 0, 1)
    yield name, np.ascontiguousarray(a)
