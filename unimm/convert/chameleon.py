"""Chameleon's VQGAN (`ChameleonForConditionalGeneration`'s `model.vqmodel`) → unimm's VQ tokenizer, and
its vocabulary map (the BPE ids of its image tokens ↔ codes). The language model converts with
`unimm.convert.llama` (QK-norm per head, Swin order).

The tokenizer is unimm's `VQModel` with Chameleon's switches (`model.vq`): `l2_normalized=False` (an
unnormalised Euclidean codebook), `norm_groups=32`, `attention_levels` (attention after the blocks of the
levels whose resolution is in `attn_resolutions`). transformers ships only its encoder and quantiser
(`quant_conv` → codebook, `post_quant_conv`): those convert, and the decoder — which the reference
implementation does not have — is left to unimm's training (`family vq` with `train.trainable=("decoder",
"post_quant_proj")`).

| transformers (`model.vqmodel.`)                      | unimm (`vq/`)                               |
|------------------------------------------------------|---------------------------------------------|
| encoder.conv_in, encoder.norm_out, encoder.conv_out  | encoder/stem, encoder/out_norm, encoder/out |
| encoder.down.i.block.j.{norm1,conv1,norm2,conv2,nin_shortcut} | encoder/down{i}_{j}/{…, skip}      |
| encoder.down.i.attn.j.{norm,q,k,v,proj_out}          | encoder/down{i}_{j}_attn/{norm,q,k,v,proj}  |
| encoder.down.i.downsample.conv                       | encoder/downsample{i}                       |
| encoder.mid.{block_1,attn_1,block_2}                 | encoder/{mid,mid_attn,mid2}                 |
| quant_conv, quantize.embedding, post_quant_conv      | quant_proj, quantizer/codebook, post_quant_proj |
"""

from __future__ import annotations

import re

import numpy as np

PREFIX = "model.vqmodel."


def vq_settings(vq: dict) -> dict:
  """config.model.vq keys of a Chameleon `vq_config`."""
  if vq.get("double_latent"):
    raise ValueError("Chameleon vq_config.double_latent=True is not supported (unimm's encoder outputs z_channels)")
  if vq.get("attn_type", "vanilla") != "vanilla":
    raise ValueError(f"Chameleon vq_config.attn_type={vq['attn_type']!r}; unimm's VQ attention is 'vanilla'")
  mults = tuple(int(m) for m in vq["channel_multiplier"])
  resolution = int(vq["resolution"])
  attn = set(vq.get("attn_resolutions") or [])
  return dict(channels=int(vq["base_channels"]), channel_mults=mults, blocks_per_level=int(vq["num_res_blocks"]),
              attention=True, z_channels=int(vq["latent_channels"]), codebook_size=int(vq["num_embeddings"]),
              code_dim=int(vq["embed_dim"]), l2_normalized=False, norm_groups=32,
              attention_levels=tuple(i for i in range(len(mults)) if resolution // 2 ** i in attn))


def code_vocabulary(vocabulary_map: dict) -> dict[int, int]:
  """{code: BPE id} from Chameleon's vocabulary map, whose image tokens are named IMGIMG<digits as A–J>Z."""
  out = {}
  for name, token_id in vocabulary_map.items():
    if name.startswith("IMGIMG") and name.endswith("Z"):
      out[int("".join(str(ord(c) - ord("A")) for c in name[len("IMGIMG"):-1]))] = int(token_id)
  return out


_RES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "skip"}
_ATTN = {"norm": "norm", "q": "q", "k": "k", "v": "v", "proj_out": "proj"}


def _our_path(name: str) -> str | None:
  body = name[len(PREFIX):]
  fixed = {"encoder.conv_in": "encoder/stem", "encoder.norm_out": "encoder/out_norm", "encoder.conv_out": "encoder/out",
           "quant_conv": "quant_proj", "post_quant_conv": "post_quant_proj", "quantize.embedding": "quantizer"}
  stem = body.rsplit(".", 1)[0]
  if stem in fixed:
    return fixed[stem]
  m = re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)", stem)
  if m and m[3] in _RES:
    return f"encoder/down{m[1]}_{m[2]}/{_RES[m[3]]}"
  m = re.fullmatch(r"encoder\.down\.(\d+)\.attn\.(\d+)\.(\w+)", stem)
  if m and m[3] in _ATTN:
    return f"encoder/down{m[1]}_{m[2]}_attn/{_ATTN[m[3]]}"
  m = re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv", stem)
  if m:
    return f"encoder/downsample{m[1]}"
  m = re.fullmatch(r"encoder\.mid\.(block_1|attn_1|block_2)(?:\.(\w+))?", stem)
  if m:
    module = {"block_1": "mid", "attn_1": "mid_attn", "block_2": "mid2"}[m[1]]
    part = (_ATTN if m[1] == "attn_1" else _RES).get(m[2])
    return f"encoder/{module}/{part}" if part else None
  return None


def import_vq(reader) -> dict:
  """The VQ tokenizer's encoder, projections and codebook (float32 NumPy) from a Chameleon checkpoint."""
  params: dict = {}
  unknown = []
  for name in reader.keys():
    if not name.startswith(PREFIX):
      continue
    path = _our_path(name)
    if path is None:
      unknown.append(name)
      continue
    a = np.asarray(reader.get(name), np.float32)
    if path == "quantizer":
      leaf, value = "codebook", a
    elif name.endswith("bias"):
      leaf, value = "bias", a
    elif a.ndim == 4 and a.shape[2:] == (1, 1) and ("_attn/" in path or path.endswith("_proj")):
      leaf, value = "kernel", a[:, :, 0, 0].T  # 1×1 convs are unimm dense layers
    elif a.ndim == 4:
      leaf, value = "kernel", a.transpose(2, 3, 1, 0)
    else:
      leaf, value = "scale", a
    node = params
    for part in path.split("/"):
      node = node.setdefault(part, {})
    node[leaf] = value
  if unknown:
    raise ValueError(f"Chameleon VQ tensors unimm does not map: {unknown[:5]} ({len(unknown)} in all)")
  return params
