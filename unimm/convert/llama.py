"""Hugging Face causal LMs of the Llama kind (`llama`, `mistral`, `qwen2`, and Chameleon's language model) ⇄
unimm's backbone and LM head.

A converted LM is the `embed` / `decoder` / `lm_head` params every family shares (`TextLM` runs exactly
those), so it serves as the text model of any family. What maps where:

| Hugging Face                                  | unimm (`decoder/layers/…` scanned, `layer_{i}/…` not) |
|-----------------------------------------------|-------------------------------------------------------|
| model.embed_tokens.weight [V, D]              | embed/embedding [V, D]                                |
| layers.i.self_attn.{q,k,v}_proj.weight [N·H, D] | attn/{q,k,v}/kernel [D, N, H] (+ bias [N, H], Qwen2) |
| layers.i.self_attn.o_proj.weight [D, N·H]     | attn/o/kernel [N, H, D]                               |
| layers.i.mlp.{gate,up}_proj.weight [F, D]     | mlp/{gate,up}/kernel [D, F]; down_proj → down [F, D]  |
| layers.i.{input,post_attention}_layernorm     | attn_norm/scale, mlp_norm/scale                       |
| model.norm.weight, lm_head.weight [V, D]      | decoder/final_norm/scale, lm_head/kernel [D, V]       |

Chameleon adds a QK-norm per head (`self_attn.{q,k}_norm.{weight,bias}` [N, H] → `attn/{q,k}_norm/{scale,bias}`,
unimm's `qk_norm_kind=head_layernorm`) and, with `swin_norm`, the Swin norm order; its VQ model is not read
here (its image tokens are ids of this vocabulary).

No permutation of q/k is needed: Hugging Face's Llama applies RoPE in the half-split layout unimm uses.
Tied embeddings (`tie_word_embeddings`) import as an LM head equal to the embedding's transpose (unimm
trains them untied); export writes them tied only when they are still equal.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

ARCHITECTURES = ("llama", "mistral", "qwen2", "chameleon")
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}  # Hugging Face's rope_type → ours


@dataclasses.dataclass(frozen=True)
class LMSpec:
  """What a Hugging Face LM config says, in unimm's terms."""

  model_type: str
  vocab_size: int
  backbone: dict  # config.model.backbone keys
  tied_embeddings: bool
  torch_dtype: str  # the checkpoint's declared dtype (export writes it back)
  special_ids: dict  # bos / eos / pad ids the config declares (None where absent)
  max_positions: int = 4096  # max_position_embeddings (informational: RoPE has no table)
  sliding_window: int | None = None  # Mistral's / Qwen2's, written back on export as the source had it


def _rope(hf: dict) -> dict:
  """RoPE θ and scaling from either Hugging Face layout: `rope_parameters` (transformers ≥ 5) or
  `rope_theta` + `rope_scaling` (the released checkpoints' config.json)."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  source = params if "rope_type" in params else scaling
  if kind not in ROPE_TYPES:
    raise ValueError(f"RoPE scaling {kind!r} is not supported (supported: {sorted(ROPE_TYPES)}); "
                     "convert a checkpoint without it or add the scaling to unimm.models.layers.rope_frequencies")
  out = {"rope_theta": float(theta), "rope_scaling": ROPE_TYPES[kind]}
  if kind in ("linear", "llama3"):
    out["rope_scaling_factor"] = float(source["factor"])
  if kind == "llama3":
    out.update(rope_low_freq_factor=float(source["low_freq_factor"]),
               rope_high_freq_factor=float(source["high_freq_factor"]),
               rope_original_max_positions=int(source["original_max_position_embeddings"]))
  return out


def _refuse(hf: dict, seq_len: int) -> None:
  model_type = hf.get("model_type")
  if model_type not in ARCHITECTURES:
    raise ValueError(f"model_type {model_type!r} is not a Llama-kind LM; unimm.convert.llama reads {ARCHITECTURES}")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"{model_type}: hidden_act={act!r}; unimm's MLP is SwiGLU (silu)")
  if hf.get("mlp_bias"):
    raise ValueError(f"{model_type}: mlp_bias=True is not supported (unimm's MLP has no biases)")
  if model_type in ("llama", "chameleon") and hf.get("attention_bias"):
    raise ValueError(f"{model_type}: attention_bias=True (biased q/k/v/o projections) is not supported; unimm's "
                     "q/k/v biases (Qwen2's) leave o_proj without one")
  window = hf.get("sliding_window")
  uses_window = model_type == "mistral" or hf.get("use_sliding_window", False)
  if window and uses_window and seq_len > int(window):
    raise ValueError(f"{model_type}: sliding_window={window} but seq_len={seq_len}: unimm attends to the whole "
                     f"row; convert with --seq_len<={window}")
  if hf.get("num_hidden_layers") is None or hf.get("hidden_size") is None:
    raise ValueError(f"{model_type}: config.json lacks num_hidden_layers / hidden_size")


def read_spec(hf: dict, seq_len: int) -> LMSpec:
  """The unimm settings of a Hugging Face LM config (`config.json` as a dict); refuses what unimm cannot
  compute exactly, by name."""
  _refuse(hf, seq_len)
  heads = int(hf["num_attention_heads"])
  backbone = dict(
      num_layers=int(hf["num_hidden_layers"]), dim=int(hf["hidden_size"]), num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads), mlp_hidden=int(hf["intermediate_size"]),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)), qkv_bias=hf["model_type"] == "qwen2",
      qk_norm=hf["model_type"] == "chameleon", qk_norm_kind="head_layernorm" if hf["model_type"] == "chameleon" else "rms",
      norm_order="swin" if hf.get("swin_norm") else "pre", **_rope(hf))
  special = {k: hf.get(f"{k}_token_id") for k in ("bos", "eos", "pad")}
  dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
  return LMSpec(hf["model_type"], int(hf["vocab_size"]), backbone, bool(hf.get("tie_word_embeddings", False)),
                dtype, special, int(hf.get("max_position_embeddings") or 4096), hf.get("sliding_window"))


# (Hugging Face name under model.layers.{i}., unimm path under the layer, kind)
_LAYER = (
    ("self_attn.q_proj.weight", "attn/q/kernel", "in_heads"),
    ("self_attn.k_proj.weight", "attn/k/kernel", "in_heads"),
    ("self_attn.v_proj.weight", "attn/v/kernel", "in_heads"),
    ("self_attn.q_proj.bias", "attn/q/bias", "bias"),
    ("self_attn.k_proj.bias", "attn/k/bias", "bias"),
    ("self_attn.v_proj.bias", "attn/v/bias", "bias"),
    ("self_attn.o_proj.weight", "attn/o/kernel", "out_heads"),
    ("self_attn.q_norm.weight", "attn/q_norm/scale", "head_norm"),
    ("self_attn.q_norm.bias", "attn/q_norm/bias", "head_norm"),
    ("self_attn.k_norm.weight", "attn/k_norm/scale", "head_norm"),
    ("self_attn.k_norm.bias", "attn/k_norm/bias", "head_norm"),
    ("mlp.gate_proj.weight", "mlp/gate/kernel", "transpose"),
    ("mlp.up_proj.weight", "mlp/up/kernel", "transpose"),
    ("mlp.down_proj.weight", "mlp/down/kernel", "transpose"),
    ("input_layernorm.weight", "attn_norm/scale", "copy"),
    ("post_attention_layernorm.weight", "mlp_norm/scale", "copy"),
)


def _layer_entries(backbone: dict):
  return [e for e in _LAYER
          if (backbone["qkv_bias"] or e[2] != "bias") and (backbone["qk_norm"] or e[2] != "head_norm")]


def _heads_of(path: str, backbone: dict) -> int:
  return backbone["num_heads"] if "/q" in path or "/o/" in path else backbone["num_kv_heads"]


def to_unimm(array: np.ndarray, kind: str, heads: int, head_dim: int) -> np.ndarray:
  """One Hugging Face tensor ([out, in] torch layout) in unimm's layout, float32."""
  a = np.asarray(array, np.float32)
  if kind == "in_heads":  # [N·H, D] → [D, N, H]
    return a.T.reshape(a.shape[1], heads, head_dim)
  if kind == "out_heads":  # [D, N·H] → [N, H, D]
    return a.T.reshape(heads, head_dim, a.shape[0])
  if kind == "bias":
    return a.reshape(heads, head_dim)
  if kind == "transpose":
    return a.T
  return a


def to_hf(array: np.ndarray, kind: str) -> np.ndarray:
  """`to_unimm`'s inverse."""
  a = np.asarray(array)
  if kind == "in_heads":  # [D, N, H] → [N·H, D]
    return a.reshape(a.shape[0], -1).T
  if kind == "out_heads":  # [N, H, D] → [D, N·H]
    return a.reshape(-1, a.shape[-1]).T
  if kind == "bias":
    return a.reshape(-1)
  if kind == "transpose":
    return a.T
  return a


def _set(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def _get(tree: dict, path: str):
  for p in path.split("/"):
    tree = tree[p]
  return tree


def _require(reader, name: str) -> None:
  if name not in reader:
    raise KeyError(f"tensor {name!r} is missing from the checkpoint (has {len(reader.keys())} tensors, e.g. "
                   f"{sorted(reader.keys())[:3]})")


def import_params(reader, spec: LMSpec, *, scan: bool, prefix: str = "model.") -> dict:
  """{embed, decoder, lm_head} params (float32 NumPy) from a checkpoint reader, tensor by tensor: the result
  is the only full copy held (a scanned stack is allocated once and filled layer by layer). `prefix`: where
  the decoder's tensors are (Janus: `model.language_model.`); the head is `lm_head.weight`."""
  b = spec.backbone
  params: dict = {}
  _require(reader, f"{prefix}embed_tokens.weight")
  embedding = np.asarray(reader.get(f"{prefix}embed_tokens.weight"), np.float32)
  if embedding.shape != (spec.vocab_size, b["dim"]):
    raise ValueError(f"{prefix}embed_tokens.weight has shape {embedding.shape}; config.json says "
                     f"({spec.vocab_size}, {b['dim']})")
  _set(params, "embed/embedding", embedding)
  head = f"{prefix}embed_tokens.weight" if spec.tied_embeddings and "lm_head.weight" not in reader else "lm_head.weight"
  _require(reader, head)
  _set(params, "lm_head/kernel", np.ascontiguousarray(np.asarray(reader.get(head), np.float32).T))
  _require(reader, f"{prefix}norm.weight")
  _set(params, "decoder/final_norm/scale", np.asarray(reader.get(f"{prefix}norm.weight"), np.float32))
  for hf_name, path, kind in _layer_entries(b):
    stack = None
    for i in range(b["num_layers"]):
      name = f"{prefix}layers.{i}.{hf_name}"
      _require(reader, name)
      value = to_unimm(reader.get(name), kind, _heads_of(path, b), b["head_dim"])
      if not scan:
        _set(params, f"decoder/layer_{i}/{path}", value)
        continue
      if stack is None:
        stack = np.empty((b["num_layers"], *value.shape), np.float32)
      stack[i] = value
    if scan:
      _set(params, f"decoder/layers/{path}", stack)
  return params


def export_tensors(params: dict, spec: LMSpec, *, scan: bool, dtype,
                   prefix: str = "model.") -> Iterator[tuple[str, np.ndarray]]:
  """(Hugging Face name, array in `dtype`) for every tensor of the LM, one at a time."""
  b = spec.backbone
  cast = lambda a: np.ascontiguousarray(np.asarray(a, np.float32).astype(dtype))  # noqa: E731
  yield f"{prefix}embed_tokens.weight", cast(_get(params, "embed/embedding"))
  for i in range(b["num_layers"]):
    for hf_name, path, kind in _layer_entries(b):
      value = _get(params, f"decoder/layers/{path}")[i] if scan else _get(params, f"decoder/layer_{i}/{path}")
      yield f"{prefix}layers.{i}.{hf_name}", cast(to_hf(value, kind))
  yield f"{prefix}norm.weight", cast(_get(params, "decoder/final_norm/scale"))
  if not spec.tied_embeddings:
    yield "lm_head.weight", cast(to_hf(_get(params, "lm_head/kernel"), "transpose"))


def heads_tied(params: dict) -> bool:
  """Whether the LM head is still the embedding's transpose (exported tied only then)."""
  return bool(np.array_equal(np.asarray(_get(params, "lm_head/kernel")).T, np.asarray(_get(params, "embed/embedding"))))


_ROPE_OUT = {"none": "default", "linear": "linear", "llama3": "llama3"}


def hf_config(spec: LMSpec, *, tied: bool, dtype: str) -> dict:
  """A config.json for the exported LM (transformers reads both rope layouts; we write the released one)."""
  b = spec.backbone
  model_type = spec.model_type
  out = {
      "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                         "qwen2": "Qwen2ForCausalLM"}[model_type]],
      "model_type": model_type, "vocab_size": spec.vocab_size, "hidden_size": b["dim"],
      "intermediate_size": b["mlp_hidden"], "num_hidden_layers": b["num_layers"],
      "num_attention_heads": b["num_heads"], "num_key_value_heads": b["num_kv_heads"], "head_dim": b["head_dim"],
      "rms_norm_eps": b["norm_eps"], "hidden_act": "silu", "tie_word_embeddings": tied, "torch_dtype": dtype,
      "rope_theta": b["rope_theta"], "max_position_embeddings": spec.max_positions,
      **{f"{k}_token_id": v for k, v in spec.special_ids.items() if v is not None},
  }
  if b["rope_scaling"] != "none":
    out["rope_scaling"] = {"rope_type": _ROPE_OUT[b["rope_scaling"]], "factor": b["rope_scaling_factor"]}
    if b["rope_scaling"] == "llama3":
      out["rope_scaling"].update(low_freq_factor=b["rope_low_freq_factor"], high_freq_factor=b["rope_high_freq_factor"],
                                 original_max_position_embeddings=b["rope_original_max_positions"])
  if model_type == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  if model_type == "qwen2":
    out.update(use_sliding_window=False, sliding_window=spec.sliding_window)
  if model_type == "mistral":  # its config defaults to a 4096 window: write the source's (None: none)
    out.update(sliding_window=spec.sliding_window)
  return out


def load(directory: str, *, seq_len: int, scan: bool = True) -> tuple[LMSpec, dict]:
  """(spec, params) of the Hugging Face LM saved in `directory` (config.json + safetensors)."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from unimm.convert import safetensors_io  # pylint: disable=g-import-not-at-top
  with open(os.path.join(directory, "config.json")) as f:
    spec = read_spec(json.load(f), seq_len)
  return spec, import_params(safetensors_io.CheckpointReader(directory), spec, scan=scan)


def numpy_dtype(name: str):
  """The NumPy dtype an export writes for a Hugging Face dtype name."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  out = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}.get(name)
  if out is None:
    raise ValueError(f"export dtype {name!r}; expected float32, bfloat16 or float16")
  return out


def save(params: dict, spec: LMSpec, directory: str, *, scan: bool, dtype: str | None = None,
         max_shard_bytes: int = 5 * 2 ** 30) -> list[str]:
  """Writes the LM as a Hugging Face model directory (config.json + safetensors, sharded past
  `max_shard_bytes`) that `AutoModelForCausalLM.from_pretrained` loads; `dtype` defaults to the
  spec's (the source checkpoint's). Returns the weight files written."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from unimm.convert import safetensors_io  # pylint: disable=g-import-not-at-top
  dtype = dtype or spec.torch_dtype
  np_dtype = numpy_dtype(dtype)
  tied = spec.tied_embeddings and heads_tied(params)
  spec = dataclasses.replace(spec, tied_embeddings=tied)
  os.makedirs(directory, exist_ok=True)
  files = safetensors_io.write_sharded(directory, export_tensors(params, spec, scan=scan, dtype=np_dtype),
                                       max_shard_bytes)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_config(spec, tied=tied, dtype=dtype), f, indent=2)
  return files
