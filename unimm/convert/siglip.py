"""Hugging Face SigLIP vision towers (`siglip_vision_model`, or a `siglip` model's `vision_config`) ⇄
unimm's ViT (`unimm.models.vit`), as the `image_encoder` (and `map_head`) params a family-siglip
checkpoint holds — what Janus reads through `model.vision.checkpoint`.

| Hugging Face (`vision_model.` prefix optional)       | unimm                                        |
|------------------------------------------------------|----------------------------------------------|
| embeddings.patch_embedding [W, C, p, p]              | image_encoder/patch_embed/kernel [p, p, C, W] |
| embeddings.position_embedding [P, W]                 | image_encoder/pos_embedding [P, W]            |
| encoder.layers.i.layer_norm{1,2}                     | block_i/attn_norm, block_i/mlp_norm           |
| encoder.layers.i.self_attn.{q,k,v}_proj [N·H, W]     | block_i/attn/{q,k,v}/kernel [W, N, H] (+ _bias) |
| encoder.layers.i.self_attn.out_proj [W, N·H]         | block_i/attn/o/kernel [N, H, W] (+ o_bias)    |
| encoder.layers.i.mlp.fc{1,2}                         | block_i/mlp/fc{1,2}                           |
| post_layernorm; head.* (MAP pooling)                 | final_norm; map_head/*                        |
"""

from __future__ import annotations

import json
import os

import numpy as np

from unimm.convert import llama

GELU = {"gelu_pytorch_tanh": False, "gelu": True}  # hidden_act → ViTConfig.gelu_exact


def read_settings(hf: dict) -> dict:
  """config.model.vision keys (and `image_size`) of a SigLIP vision config.json."""
  if hf.get("model_type") == "siglip":
    hf = hf["vision_config"]
  if hf.get("model_type", "siglip_vision_model") != "siglip_vision_model":
    raise ValueError(f"model_type {hf.get('model_type')!r}; unimm.convert.siglip reads siglip_vision_model")
  act = hf.get("hidden_act", "gelu_pytorch_tanh")
  if act not in GELU:
    raise ValueError(f"SigLIP hidden_act={act!r}; unimm's ViT has {sorted(GELU)}")
  if abs(float(hf.get("layer_norm_eps", 1e-6)) - 1e-6) > 1e-12:
    raise ValueError(f"SigLIP layer_norm_eps={hf['layer_norm_eps']}; unimm's ViT uses 1e-6")
  return dict(patch_size=int(hf["patch_size"]), width=int(hf["hidden_size"]), depth=int(hf["num_hidden_layers"]),
              num_heads=int(hf["num_attention_heads"]), mlp_dim=int(hf["intermediate_size"]), gelu_exact=GELU[act],
              image_size=int(hf["image_size"]), use_head=bool(hf.get("vision_use_head", True)))


def _linear(array, heads: int | None = None, into_heads: bool = True) -> np.ndarray:
  """A torch [out, in] weight in unimm's layout: transposed, or split into heads as the backbone's q/k/v/o
  (`llama.to_unimm`)."""
  if heads is None:
    return llama.to_unimm(array, "transpose", 0, 0)
  width = np.shape(array)[0 if into_heads else 1]
  return llama.to_unimm(array, "in_heads" if into_heads else "out_heads", heads, width // heads)


def _attention(get, prefix: str, heads: int, packed_in: bool = False, out_proj: str = "out_proj") -> dict:
  """A biased multi-head attention's params; `packed_in`: torch's nn.MultiheadAttention (in_proj); `out_proj`
  the output projection's name (Janus's vision tower: projection_layer)."""
  out = {}
  if packed_in:
    w, b = np.asarray(get(prefix + "in_proj_weight"), np.float32), np.asarray(get(prefix + "in_proj_bias"), np.float32)
    pieces = zip("qkv", np.split(w, 3), np.split(b, 3))
  else:
    pieces = ((n, get(f"{prefix}{n}_proj.weight"), get(f"{prefix}{n}_proj.bias")) for n in "qkv")
  o_name = f"{prefix}{out_proj}."
  for name, weight, bias in pieces:
    out[name] = {"kernel": _linear(weight, heads)}
    out[f"{name}_bias"] = np.asarray(bias, np.float32).reshape(heads, -1)
  out["o"] = {"kernel": _linear(get(o_name + "weight"), heads, into_heads=False)}
  out["o_bias"] = np.asarray(get(o_name + "bias"), np.float32)
  return out


def _norm(get, prefix: str) -> dict:
  return {"scale": np.asarray(get(prefix + "weight"), np.float32), "bias": np.asarray(get(prefix + "bias"), np.float32)}


def _dense(get, prefix: str) -> dict:
  return {"kernel": _linear(get(prefix + "weight")), "bias": np.asarray(get(prefix + "bias"), np.float32)}


def import_params(reader, settings: dict, prefix: str | None = None, out_proj: str = "out_proj") -> dict:
  """{"image_encoder": ViT params[, "map_head": MAP head params]} from a checkpoint reader; `prefix` (default:
  `vision_model.` where the checkpoint has it) and `out_proj` name Janus's tower inside its checkpoint.
  Projections without biases (Janus's attention_bias=False) get zero biases."""
  if prefix is None:
    prefix = "vision_model." if "vision_model.embeddings.patch_embedding.weight" in reader else ""

  def get(name):
    if prefix + name not in reader:
      if name.endswith("_proj.bias") and prefix + name.removesuffix("bias") + "weight" in reader:
        return np.zeros(np.shape(reader.get(prefix + name.removesuffix("bias") + "weight"))[0], np.float32)
      raise KeyError(f"tensor {prefix + name!r} is missing from the SigLIP checkpoint")
    return reader.get(prefix + name)

  heads = settings["num_heads"]
  vit = {"patch_embed": {"kernel": np.asarray(get("embeddings.patch_embedding.weight"), np.float32).transpose(2, 3, 1, 0),
                         "bias": np.asarray(get("embeddings.patch_embedding.bias"), np.float32)},
         "pos_embedding": np.asarray(get("embeddings.position_embedding.weight"), np.float32),
         "final_norm": _norm(get, "post_layernorm.")}
  for i in range(settings["depth"]):
    p = f"encoder.layers.{i}."
    vit[f"block_{i}"] = {"attn_norm": _norm(get, p + "layer_norm1."), "mlp_norm": _norm(get, p + "layer_norm2."),
                         "attn": _attention(get, p + "self_attn.", heads, out_proj=out_proj),
                         "mlp": {"fc1": _dense(get, p + "mlp.fc1."), "fc2": _dense(get, p + "mlp.fc2.")}}
  out = {"image_encoder": vit}
  if settings["use_head"]:
    out["map_head"] = {"probe": np.asarray(get("head.probe"), np.float32),
                       "attn": _attention(get, "head.attention.", heads, packed_in=True),
                       "norm": _norm(get, "head.layernorm."),
                       "mlp": {"fc1": _dense(get, "head.mlp.fc1."), "fc2": _dense(get, "head.mlp.fc2.")}}
  return out


def load(directory: str) -> tuple[dict, dict]:
  """(settings, params) of a Hugging Face SigLIP (vision) model directory."""
  from unimm.convert import safetensors_io  # pylint: disable=g-import-not-at-top
  with open(os.path.join(directory, "config.json")) as f:
    settings = read_settings(json.load(f))
  return settings, import_params(safetensors_io.CheckpointReader(directory), settings)


def vit_config(settings: dict, **overrides):
  from unimm.models import vit  # pylint: disable=g-import-not-at-top
  keys = ("patch_size", "width", "depth", "num_heads", "mlp_dim", "gelu_exact")
  return vit.ViTConfig(**{k: settings[k] for k in keys}, **overrides)


def _f32(a) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(a, np.float32))


def _export_norm(prefix: str, node: dict):
  yield f"{prefix}.weight", _f32(node["scale"])
  yield f"{prefix}.bias", _f32(node["bias"])


def _export_mlp(prefix: str, node: dict):
  for fc in ("fc1", "fc2"):
    yield f"{prefix}{fc}.weight", _f32(np.asarray(node[fc]["kernel"]).T)
    yield f"{prefix}{fc}.bias", _f32(node[fc]["bias"])


def export_head(head: dict, prefix: str = "vision_model."):
  """(Hugging Face name, float32 array) of a MAP head (`map_head` params): `import_params`' inverse."""
  attn = head["attn"]
  yield f"{prefix}head.probe", _f32(head["probe"])
  yield f"{prefix}head.attention.in_proj_weight", _f32(np.concatenate(
      [llama.to_hf(attn[n]["kernel"], "in_heads") for n in "qkv"], 0))
  yield f"{prefix}head.attention.in_proj_bias", _f32(np.concatenate([np.reshape(attn[f"{n}_bias"], -1) for n in "qkv"]))
  yield f"{prefix}head.attention.out_proj.weight", _f32(llama.to_hf(attn["o"]["kernel"], "out_heads"))
  yield f"{prefix}head.attention.out_proj.bias", _f32(attn["o_bias"])
  yield from _export_norm(f"{prefix}head.layernorm", head["norm"])
  yield from _export_mlp(f"{prefix}head.mlp.", head["mlp"])


def hf_config(vision, image_size: int, channels: int, use_head: bool) -> dict:
  """A SiglipVisionModel config.json for `config.model.vision` (a ViTConfig's keys)."""
  return {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
          "hidden_size": int(vision["width"]), "intermediate_size": int(vision["mlp_dim"]),
          "num_hidden_layers": int(vision["depth"]), "num_attention_heads": int(vision["num_heads"]),
          "patch_size": int(vision["patch_size"]), "image_size": int(image_size), "num_channels": int(channels),
          "hidden_act": "gelu" if vision.get("gelu_exact", False) else "gelu_pytorch_tanh",
          "layer_norm_eps": 1e-6, "vision_use_head": bool(use_head), "torch_dtype": "float32"}


def export_tensors(vit: dict, prefix: str = "vision_model.", out_proj: str = "out_proj"):
  """(Hugging Face name, float32 array) for every tensor of a unimm ViT (`image_encoder` params): the
  inverse of `import_params`' tower (the MAP head: `export_head`)."""
  f32 = _f32
  yield f"{prefix}embeddings.patch_embedding.weight", f32(np.asarray(vit["patch_embed"]["kernel"]).transpose(3, 2, 0, 1))
  yield f"{prefix}embeddings.patch_embedding.bias", f32(vit["patch_embed"]["bias"])
  yield f"{prefix}embeddings.position_embedding.weight", f32(vit["pos_embedding"])
  depth = sum(1 for k in vit if k.startswith("block_"))
  for i in range(depth):
    block, p = vit[f"block_{i}"], f"encoder.layers.{i}."
    yield from _export_norm(f"{prefix}{p}layer_norm1", block["attn_norm"])
    yield from _export_norm(f"{prefix}{p}layer_norm2", block["mlp_norm"])
    attn = block["attn"]
    for n in "qkv":
      yield f"{prefix}{p}self_attn.{n}_proj.weight", f32(llama.to_hf(attn[n]["kernel"], "in_heads"))
      yield f"{prefix}{p}self_attn.{n}_proj.bias", f32(np.reshape(attn[f"{n}_bias"], -1))
    yield f"{prefix}{p}self_attn.{out_proj}.weight", f32(llama.to_hf(attn["o"]["kernel"], "out_heads"))
    yield f"{prefix}{p}self_attn.{out_proj}.bias", f32(attn["o_bias"])
    yield from _export_mlp(f"{prefix}{p}mlp.", block["mlp"])
  yield from _export_norm(f"{prefix}post_layernorm", vit["final_norm"])
