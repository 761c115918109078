"""diffusers' `AutoencoderKL` (SD, SDXL, FLUX-style VAEs) ⇄ unimm's KL-VAE in its `diffusers` layout.

The layout is a switch on unimm's modules (`model.autoencoder.layout=diffusers`, see
`unimm.models.autoencoders`), and the names map one to one:

| diffusers                                        | unimm (`encoder/` or `decoder/`)          |
|--------------------------------------------------|-------------------------------------------|
| conv_in, conv_norm_out, conv_out                 | stem, out_norm, out                       |
| down_blocks.i.resnets.j.{norm1,conv1,norm2,conv2,conv_shortcut} | down{i}_{j}/{…, skip}      |
| down_blocks.i.downsamplers.0.conv                | downsample{i}                             |
| up_blocks.k.resnets.j / upsamplers.0.conv        | up{L−1−k}_{j} / upsample{L−1−k}           |
| mid_block.resnets.{0,1}, mid_block.attentions.0  | mid, mid2, mid_attn/{norm,q,k,v,proj}     |
| quant_conv, post_quant_conv                      | quant_conv, post_quant_conv               |

Conv kernels [O, I, kh, kw] become [kh, kw, I, O]; linear ones [O, I] become [I, O]. `scaling_factor` and
`shift_factor` become the pinned latent `scale` and `shift`: the diffusion sees (z − shift)·scale, as
diffusers' pipelines feed their transformers.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
_ATTENTION = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj",
              "query": "q", "key": "k", "value": "v", "proj_attn": "proj", "group_norm": "norm"}  # old names too


def read_settings(hf: dict) -> dict:
  """config.model.autoencoder keys for a diffusers AutoencoderKL config.json; refuses other kinds by name."""
  if hf.get("_class_name") != "AutoencoderKL":
    raise ValueError(f"_class_name {hf.get('_class_name')!r}; unimm.convert.diffusers_vae reads AutoencoderKL")
  blocks = list(hf["block_out_channels"])
  base = blocks[0]
  if any(b % base for b in blocks):
    raise ValueError(f"block_out_channels {blocks} are not multiples of the first; unimm's widths are "
                     "channels × channel_mults")
  for key, want in (("act_fn", "silu"),):
    if hf.get(key, want) != want:
      raise ValueError(f"AutoencoderKL {key}={hf[key]!r}; unimm's VAE uses {want}")
  kinds = set(hf.get("down_block_types", [])) | set(hf.get("up_block_types", []))
  if kinds - {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
    raise ValueError(f"AutoencoderKL blocks {sorted(kinds)}; unimm maps DownEncoderBlock2D / UpDecoderBlock2D")
  if hf.get("in_channels", 3) != hf.get("out_channels", 3):
    raise ValueError("AutoencoderKL in_channels != out_channels")
  quant = bool(hf.get("use_quant_conv", True))
  if quant != bool(hf.get("use_post_quant_conv", True)):
    raise ValueError("AutoencoderKL with only one of use_quant_conv / use_post_quant_conv is not supported")
  return dict(
      kind="kl_vae", layout="diffusers", channels=base, channel_mults=tuple(b // base for b in blocks),
      blocks_per_level=int(hf.get("layers_per_block", 1)), latent_channels=int(hf["latent_channels"]),
      downsample=2 ** (len(blocks) - 1), norm_groups=int(hf.get("norm_num_groups", 32)),
      mid_attention=bool(hf.get("mid_block_add_attention", True)), quant_conv=quant,
      scale=float(hf.get("scaling_factor", 0.18215)), shift=float(hf.get("shift_factor") or 0.0))


def _our_path(name: str, levels: int) -> tuple[str, str] | None:
  """(unimm path without the leaf, leaf kind) for a diffusers tensor name, or None if it is unknown."""
  m = re.fullmatch(r"(encoder|decoder)\.(.*)\.(weight|bias)", name)
  if not m:
    m2 = re.fullmatch(r"(quant_conv|post_quant_conv)\.(weight|bias)", name)
    return (m2[1], m2[2]) if m2 else None
  side, body, leaf = m[1], m[2], m[3]
  simple = {"conv_in": "stem", "conv_norm_out": "out_norm", "conv_out": "out",
            "mid_block.resnets.0": "mid", "mid_block.resnets.1": "mid2"}
  if body in simple:
    return f"{side}/{simple[body]}", leaf
  r = re.fullmatch(r"mid_block\.resnets\.([01])\.(norm1|conv1|norm2|conv2|conv_shortcut)", body)
  if r:
    return f"{side}/{'mid' if r[1] == '0' else 'mid2'}/{'skip' if r[2] == 'conv_shortcut' else r[2]}", leaf
  r = re.fullmatch(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn|group_norm)", body)
  if r:
    return f"{side}/mid_attn/{_ATTENTION[r[1]]}", leaf
  r = re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut)", body)
  if r:
    level = int(r[2]) if r[1] == "down" else levels - 1 - int(r[2])
    return f"{side}/{r[1]}{level}_{r[3]}/{'skip' if r[4] == 'conv_shortcut' else r[4]}", leaf
  r = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(downsamplers|upsamplers)\.0\.conv", body)
  if r:
    level = int(r[2]) if r[1] == "down" else levels - 1 - int(r[2])
    return f"{side}/{r[1]}sample{level}", leaf
  return None


def to_unimm(name: str, array: np.ndarray) -> tuple[str, np.ndarray] | None:
  """(unimm leaf name, array in unimm's layout) of one diffusers tensor."""
  a = np.asarray(array, np.float32)
  if name.endswith("bias"):
    return "bias", a
  if a.ndim == 4:  # conv [O, I, kh, kw] → [kh, kw, I, O]
    return "kernel", a.transpose(2, 3, 1, 0)
  if a.ndim == 2:  # linear (attention projections) [O, I] → [I, O]
    return "kernel", a.T
  return "scale", a  # GroupNorm's weight


def import_params(reader, settings: dict) -> dict:
  """The KL-VAE's params (float32 NumPy) from a diffusers checkpoint, tensor by tensor."""
  levels = len(settings["channel_mults"])
  params: dict = {}
  unknown = []
  for name in reader.keys():
    where = _our_path(name, levels)
    if where is None:
      unknown.append(name)
      continue
    array = reader.get(name)
    if array.ndim == 4 and array.shape[2:] == (1, 1) and "mid_attn" in where[0]:
      array = array[:, :, 0, 0]  # attention projections stored as 1×1 convs by old checkpoints
    leaf, value = to_unimm(name, array)
    node = params
    for part in where[0].split("/"):
      node = node.setdefault(part, {})
    node[leaf] = value
  if unknown:
    raise ValueError(f"AutoencoderKL tensors unimm does not map: {unknown[:5]} ({len(unknown)} in all)")
  return params


def load(directory: str) -> tuple[dict, dict]:
  """(config.model.autoencoder settings, params) of a diffusers AutoencoderKL directory (or its `vae/`)."""
  from unimm.convert import safetensors_io  # pylint: disable=g-import-not-at-top
  if os.path.isdir(os.path.join(directory, "vae")) and not os.path.exists(os.path.join(directory, "config.json")):
    directory = os.path.join(directory, "vae")  # a whole pipeline's directory
  with open(os.path.join(directory, "config.json")) as f:
    settings = read_settings(json.load(f))
  return settings, import_params(safetensors_io.CheckpointReader(directory), settings)


def _hf_name(path: str, leaf: str, levels: int) -> str:
  """The diffusers name of a unimm KL-VAE leaf (`_our_path`'s inverse)."""
  parts = path.split("/")
  if parts[0] in ("quant_conv", "post_quant_conv"):
    return f"{parts[0]}.{_LEAF_OUT[leaf]}"
  side, module, rest = parts[0], parts[1], parts[2:]
  simple = {"stem": "conv_in", "out_norm": "conv_norm_out", "out": "conv_out"}
  sub = {"skip": "conv_shortcut"}
  attention = {"q": "to_q", "k": "to_k", "v": "to_v", "proj": "to_out.0", "norm": "group_norm"}
  if module in simple:
    body = simple[module]
  elif module in ("mid", "mid2"):
    body = f"mid_block.resnets.{0 if module == 'mid' else 1}.{sub.get(rest[0], rest[0])}"
  elif module == "mid_attn":
    body = f"mid_block.attentions.0.{attention[rest[0]]}"
  else:
    m = re.fullmatch(r"(down|up)(\d+)_(\d+)", module)
    if m:
      block = int(m[2]) if m[1] == "down" else levels - 1 - int(m[2])
      body = f"{m[1]}_blocks.{block}.resnets.{m[3]}.{sub.get(rest[0], rest[0])}"
    else:
      m = re.fullmatch(r"(down|up)sample(\d+)", module)
      block = int(m[2]) if m[1] == "down" else levels - 1 - int(m[2])
      body = f"{m[1]}_blocks.{block}.{m[1]}samplers.0.conv"
  return f"{side}.{body}.{_LEAF_OUT[leaf]}"


_LEAF_OUT = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def to_diffusers(leaf: str, array) -> np.ndarray:
  a = np.asarray(array, np.float32)
  if leaf == "kernel" and a.ndim == 4:  # [kh, kw, I, O] → [O, I, kh, kw]
    return a.transpose(3, 2, 0, 1)
  if leaf == "kernel":
    return a.T
  return a


def hf_config(settings: dict, image_channels: int = 3) -> dict:
  """The AutoencoderKL config.json of unimm autoencoder settings (layout diffusers)."""
  if settings.get("layout") != "diffusers":
    raise ValueError("only a KL-VAE in the diffusers layout (model.autoencoder.layout=diffusers) exports as "
                     "an AutoencoderKL; unimm's own layout has no diffusers equivalent")
  blocks = [settings["channels"] * m for m in settings["channel_mults"]]
  return {"_class_name": "AutoencoderKL", "in_channels": image_channels, "out_channels": image_channels,
          "down_block_types": ["DownEncoderBlock2D"] * len(blocks), "up_block_types": ["UpDecoderBlock2D"] * len(blocks),
          "block_out_channels": blocks, "layers_per_block": settings["blocks_per_level"], "act_fn": "silu",
          "latent_channels": settings["latent_channels"], "norm_num_groups": settings["norm_groups"],
          "scaling_factor": settings["scale"], "shift_factor": settings["shift"] or None,
          "use_quant_conv": settings["quant_conv"], "use_post_quant_conv": settings["quant_conv"],
          "mid_block_add_attention": settings["mid_attention"]}


def save(params: dict, settings: dict, directory: str, image_channels: int = 3) -> None:
  """Writes a KL-VAE (diffusers layout) as a diffusers AutoencoderKL directory (from_pretrained loads it)."""
  from unimm.convert import safetensors_io  # pylint: disable=g-import-not-at-top
  levels = len(settings["channel_mults"])
  config = hf_config(settings, image_channels)

  def walk(tree, prefix=""):
    for key, value in tree.items():
      if isinstance(value, dict):
        yield from walk(value, f"{prefix}{key}/")
      else:
        yield prefix.rstrip("/"), key, value
  os.makedirs(directory, exist_ok=True)
  tensors = ((_hf_name(path, leaf, levels), to_diffusers(leaf, value)) for path, leaf, value in walk(params))
  files = safetensors_io.write_sharded(directory, tensors, 2 ** 40)
  os.replace(os.path.join(directory, files[0]), os.path.join(directory, WEIGHTS_FILE))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
