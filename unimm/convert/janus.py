"""transformers' Janus / Janus-Pro (`JanusForConditionalGeneration`) ⇄ unimm's Janus family.

| transformers                                          | unimm                                         |
|-------------------------------------------------------|-----------------------------------------------|
| model.language_model.* (Llama), lm_head               | embed, decoder, lm_head (`unimm.convert.llama`) |
| model.vision_model.* (SigLIP; out proj `projection_layer`) | vision_encoder (`unimm.convert.siglip`)  |
| model.aligner.fc1, .hidden_layers.0                   | und_aligner/fc1, fc2                          |
| model.generation_embeddings [codes, embed_dim]        | gen_embed                                     |
| model.generation_aligner.fc1, .hidden_layers.0        | gen_aligner/fc1, fc2                          |
| model.generation_head.proj_out, .vision_head          | gen_head/fc1, fc2                             |
| model.vqmodel.* (LlamaGen's VQGAN, encoder + decoder) | the frozen tokenizer's `vq` (`unimm.convert.vqgan`) |

Switches this sets: the ViT's and the adaptors' exact GELU (`hidden_act="gelu"`), the tokenizer's
taming layout (one more decoder block a level, nearest-neighbour upsampling), 32-group norms and
attention after every block of the lowest-resolution level, and the codebook looked up by cosine
(LlamaGen's `codebook_l2_norm`, which DeepSeek's Janus code applies on encode and decode; transformers
normalises only on decode, so the two agree when the stored rows have unit norm).
"""

from __future__ import annotations

import json
import os

import numpy as np

from unimm.convert import llama, siglip, vqgan

LM_PREFIX = "model.language_model."
VISION_PREFIX = "model.vision_model."
VQ_PREFIX = "model.vqmodel."
GELU = {"gelu": True, "gelu_pytorch_tanh": False}  # hidden_act → exact
# The released tokenizer's image markers and padding, mapped to unimm's roles where the tokenizer has them.
SPECIAL_TOKENS = {"boi": "<begin_of_image>", "eoi": "<end_of_image>", "img": "<image_placeholder>",
                  "pad": "<｜▁pad▁｜>"}


def _act(section: str, act: str) -> bool:
  if act not in GELU:
    raise ValueError(f"Janus {section}.hidden_act={act!r}; unimm has {sorted(GELU)}")
  return GELU[act]


def read_settings(hf: dict, seq_len: int) -> dict:
  """unimm's settings for a Janus config.json: the LM spec, `model.vision`, `model.vq`, the adaptors' GELU,
  the image size. Refuses, by name, what unimm's Janus cannot compute exactly."""
  if hf.get("model_type") != "janus":
    raise ValueError(f"model_type {hf.get('model_type')!r}; unimm.convert.janus reads 'janus'")
  text, vision, vq = dict(hf["text_config"]), dict(hf.get("vision_config") or {}), dict(hf.get("vq_config") or {})
  if text.get("model_type", "llama") != "llama":
    raise ValueError(f"Janus text_config.model_type={text.get('model_type')!r}; unimm reads a Llama language model")
  text.setdefault("model_type", "llama")
  text["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
  spec = llama.read_spec(text, seq_len)
  dim = spec.backbone["dim"]
  if vision.get("use_qk_norm"):
    raise ValueError("Janus vision_config.use_qk_norm=True: unimm's ViT has no QK-norm")
  if abs(float(vision.get("layer_norm_eps", 1e-6)) - 1e-6) > 1e-12:
    raise ValueError(f"Janus vision_config.layer_norm_eps={vision['layer_norm_eps']}; unimm's ViT uses 1e-6")
  checks = {"vision_config.depth": (int(vision.get("depth", 2)), 2),
            "vq_config.num_hidden_layers": (int(vq.get("num_hidden_layers", 2)), 2),
            "vision_config.projection_dim": (int(vision.get("projection_dim", 2048)), dim),
            "vq_config.projection_dim": (int(vq.get("projection_dim", 2048)), dim),
            "vq_config.image_token_embed_dim": (int(vq.get("image_token_embed_dim", 2048)), dim),
            "vq_config.double_latent": (bool(vq.get("double_latent", False)), False),
            "vq_config.in_channels": (int(vq.get("in_channels", 3)), int(vq.get("out_channels", 3)))}
  wrong = {k: v for k, (v, want) in checks.items() if v != want}
  if wrong:
    raise ValueError(f"Janus {wrong}: unimm's Janus has two-layer adaptors of the text width ({dim}), one latent "
                     "and as many image channels in as out")
  vision_exact = _act("vision_config", vision.get("hidden_act", "gelu"))
  adaptor_exact = _act("vq_config", vq.get("hidden_act", "gelu"))
  if vision_exact != adaptor_exact:
    raise ValueError(f"Janus vision_config.hidden_act={vision.get('hidden_act')!r} but vq_config.hidden_act="
                     f"{vq.get('hidden_act')!r}: unimm's adaptors share one GELU")
  width, image_size, patch = int(vision.get("hidden_size", 1024)), int(vision.get("image_size", 384)), int(
      vision.get("patch_size", 16))
  mults = tuple(int(m) for m in vq.get("channel_multiplier", (1, 1, 2, 2, 4)))
  if image_size // patch != image_size // 2 ** (len(mults) - 1):
    raise ValueError(f"Janus: the ViT's {image_size // patch}² patches differ from the VQ's "
                     f"{image_size // 2 ** (len(mults) - 1)}² codes; unimm gives each image one slot per both")
  return {
      "spec": spec, "image_token_id": int(hf.get("image_token_id", -1)), "image_size": image_size,
      "adaptor_gelu_exact": adaptor_exact,
      "vision": dict(patch_size=patch, width=width, depth=int(vision.get("num_hidden_layers", 24)),
                     num_heads=int(vision.get("num_attention_heads", 16)),
                     mlp_dim=int(width * float(vision.get("mlp_ratio", 4.0))), gelu_exact=vision_exact),
      "vq": dict(channels=int(vq.get("base_channels", 128)), channel_mults=mults,
                 blocks_per_level=int(vq.get("num_res_blocks", 2)), attention=True,
                 z_channels=int(vq.get("latent_channels", 256)), codebook_size=int(vq.get("num_embeddings", 16384)),
                 code_dim=int(vq.get("embed_dim", 8)), l2_normalized=True, norm_groups=32,
                 attention_levels=(len(mults) - 1,), layout="taming"),
  }


def _dense(reader, name: str) -> dict:
  if name + ".weight" not in reader:
    raise KeyError(f"tensor {name + '.weight'!r} is missing from the Janus checkpoint")
  return {"kernel": np.ascontiguousarray(np.asarray(reader.get(name + ".weight"), np.float32).T),
          "bias": np.asarray(reader.get(name + ".bias"), np.float32)}


def _adaptor(reader, first: str, second: str) -> dict:
  return {"fc1": _dense(reader, first), "fc2": _dense(reader, second)}


def import_params(reader, settings: dict, *, scan: bool) -> tuple[dict, dict]:
  """(the Janus model's params, the VQ tokenizer's params), float32 NumPy, read tensor by tensor."""
  params = llama.import_params(reader, settings["spec"], scan=scan, prefix=LM_PREFIX)
  vit = {**settings["vision"], "use_head": False}
  params["vision_encoder"] = siglip.import_params(reader, vit, prefix=VISION_PREFIX,
                                                  out_proj="projection_layer")["image_encoder"]
  params["und_aligner"] = _adaptor(reader, "model.aligner.fc1", "model.aligner.hidden_layers.0")
  params["gen_embed"] = np.asarray(reader.get("model.generation_embeddings.weight"), np.float32)
  params["gen_aligner"] = _adaptor(reader, "model.generation_aligner.fc1", "model.generation_aligner.hidden_layers.0")
  params["gen_head"] = _adaptor(reader, "model.generation_head.proj_out", "model.generation_head.vision_head")
  vq = vqgan.import_params(reader, VQ_PREFIX, len(settings["vq"]["channel_mults"]))
  return params, vq


def load(directory: str, *, seq_len: int, scan: bool = True) -> tuple[dict, dict, dict]:
  """(settings, model params, VQ params) of a Janus model directory."""
  from unimm.convert import safetensors_io  # pylint: disable=g-import-not-at-top
  with open(os.path.join(directory, "config.json")) as f:
    settings = read_settings(json.load(f), seq_len)
  return (settings, *import_params(safetensors_io.CheckpointReader(directory), settings, scan=scan))


def special_tokens(vocabulary: dict) -> dict:
  """`data.tokenizer.special_tokens` for a Janus tokenizer: the image markers and PAD it has."""
  return {role: token for role, token in SPECIAL_TOKENS.items() if token in vocabulary}


def _export_refusals(config) -> list[str]:
  """The settings of a Janus config that transformers' Janus cannot hold."""
  m = config.model
  vq, vision, mults = m.vq, m.vision, tuple(m.vq.channel_mults)
  checks = {"model.vq.layout": (vq.get("layout", "unimm"), "taming"),
            "model.vq.norm_groups": (int(vq.norm_groups), 32),
            "model.vq.attention_levels": (tuple(vq.attention_levels), (len(mults) - 1,)),
            "model.vq.attention": (bool(vq.attention), True),
            "model.vq.l2_normalized": (bool(vq.l2_normalized), True),
            "model.vision.feature_layer": (int(vision.feature_layer), -1),
            "model.adaptor_gelu_exact": (bool(m.get("adaptor_gelu_exact", False)), bool(vision.gelu_exact))}
  return [f"{k}={v!r} (transformers' Janus has {want!r})" for k, (v, want) in checks.items() if v != want]


def hf_config(config, spec: "llama.LMSpec", *, dtype: str) -> dict:
  """A JanusForConditionalGeneration config.json for a unimm Janus config; refuses, by name, what the
  format cannot hold."""
  refused = _export_refusals(config)
  if refused:
    raise ValueError(f"cannot export as transformers' Janus: {'; '.join(refused)}")
  m, d = config.model, config.data
  dim, act = spec.backbone["dim"], "gelu" if m.vision.gelu_exact else "gelu_pytorch_tanh"
  text = llama.hf_config(spec, tied=False, dtype=dtype)
  text.pop("architectures")
  image_size, patch = int(d.image_size), int(m.vision.patch_size)
  vision = dict(model_type="janus_vision_model", hidden_size=int(m.vision.width),
                num_hidden_layers=int(m.vision.depth), num_attention_heads=int(m.vision.num_heads),
                image_size=image_size, patch_size=patch, mlp_ratio=int(m.vision.mlp_dim) / int(m.vision.width),
                hidden_act=act, layer_norm_eps=1e-6, attention_bias=True, use_qk_norm=False, projection_dim=dim,
                depth=2, num_image_tokens=(image_size // patch) ** 2)
  mults = [int(x) for x in m.vq.channel_mults]
  vq = dict(model_type="janus_vqgan", embed_dim=int(m.vq.code_dim), num_embeddings=int(m.vq.codebook_size),
            latent_channels=int(m.vq.z_channels), base_channels=int(m.vq.channels), channel_multiplier=mults,
            num_res_blocks=int(m.vq.blocks_per_level), in_channels=int(d.image_channels),
            out_channels=int(d.image_channels), projection_dim=dim, image_token_embed_dim=dim, num_hidden_layers=2,
            hidden_act=act, num_patches=image_size // 2 ** (len(mults) - 1))
  hf = config.get("hf") or {}
  return {"architectures": ["JanusForConditionalGeneration"], "model_type": "janus", "text_config": text,
          "vision_config": vision, "vq_config": vq, "image_token_id": int(hf.get("image_token_id", -1)),
          "tie_word_embeddings": False, "torch_dtype": dtype}


def export_tensors(params: dict, vq_params: dict, spec: "llama.LMSpec", config, *, scan: bool, dtype):
  """(transformers name, array in `dtype`) for every tensor of the Janus model, one at a time."""
  cast = lambda a: np.ascontiguousarray(np.asarray(a, np.float32).astype(dtype))  # noqa: E731
  yield from llama.export_tensors(params, spec, scan=scan, dtype=dtype, prefix=LM_PREFIX)
  for name, a in siglip.export_tensors(params["vision_encoder"], VISION_PREFIX, "projection_layer"):
    yield name, cast(a)
  adaptors = {"und_aligner": ("model.aligner.fc1", "model.aligner.hidden_layers.0"),
              "gen_aligner": ("model.generation_aligner.fc1", "model.generation_aligner.hidden_layers.0"),
              "gen_head": ("model.generation_head.proj_out", "model.generation_head.vision_head")}
  for ours, names in adaptors.items():
    for fc, name in zip(("fc1", "fc2"), names):
      yield f"{name}.weight", cast(np.asarray(params[ours][fc]["kernel"]).T)
      yield f"{name}.bias", cast(params[ours][fc]["bias"])
  yield "model.generation_embeddings.weight", cast(params["gen_embed"])
  for name, a in vqgan.export_tensors(vq_params, VQ_PREFIX, len(config.model.vq.channel_mults)):
    yield name, cast(a)
