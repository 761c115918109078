"""Hugging Face Llama / Mistral / Qwen2 checkpoints ⇄ unimm, judged by transformers' own implementation.

Each case builds a tiny random reference model with a fixed seed (norm weights and biases randomised too,
so a dropped or misplaced one shows), saves it with `save_pretrained`, converts it with unimm.convert and
compares next-token logits in float32.
"""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from unimm.convert import llama, safetensors_io  # noqa: E402
from unimm.data import packed  # noqa: E402
from unimm.models import backbone, text_lm  # noqa: E402

TOL = 1e-4  # max abs logit difference in float32 (the bar)
VOCAB = 160


def _randomise(model, seed: int):
  """Norm weights ≠ 1 and biases ≠ 0 (their inits), so each must land in the right place to match."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
      elif name.endswith("bias"):
        p.copy_(0.5 * torch.randn(p.shape, generator=gen))


def _save(kind: str, directory: str, seed: int = 0, dtype=None, **overrides):
  cls_config, cls_model = {
      "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
      "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
      "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
  settings = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
                  initializer_range=0.2)  # larger than the default 0.02: attention (so RoPE) shows in the logits
  settings.update(overrides)
  torch.manual_seed(seed)
  model = cls_model(cls_config(**settings)).eval()
  _randomise(model, seed)
  if dtype is not None:
    model = model.to(dtype)
  model.save_pretrained(directory)
  return model


def _rows(ids: np.ndarray) -> packed.Rows:
  b, t = ids.shape
  return packed.Rows(jnp.asarray(ids, jnp.int32), jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
                     jnp.ones((b, t), jnp.int32), jnp.zeros((b, t), jnp.int32))


def _unimm_logits(spec, params, ids, scan: bool, **backbone_overrides):
  settings = {**spec.backbone, **backbone_overrides}
  cfg = backbone.BackboneConfig(**settings, dtype="float32", remat="none", scan=scan, attention="xla",
                                bidirectional_images=False)
  return np.asarray(text_lm.TextLM(spec.vocab_size, cfg).apply({"params": params}, _rows(ids)))


def _reference_logits(directory: str, ids: np.ndarray) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def _ids(seed: int, length: int = 48) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, (2, length))


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


@pytest.mark.parametrize("scan", [True, False])
def test_llama_gqa_llama3_rope_matches_transformers(tmp_path, scan):
  directory = str(tmp_path / "llama")
  _save("llama", directory, rope_theta=5e5, rope_scaling=LLAMA3_ROPE)
  spec, params = llama.load(directory, seq_len=64, scan=scan)
  assert (spec.backbone["num_kv_heads"], spec.backbone["rope_scaling"], spec.backbone["rope_theta"]) == (2, "llama3", 5e5)
  ids = _ids(1)
  ours, ref = _unimm_logits(spec, params, ids, scan), _reference_logits(directory, ids)
  assert np.abs(ours - ref).max() <= TOL
  # The scaling and θ matter at these positions: dropping either misses the reference by far.
  assert np.abs(_unimm_logits(spec, params, ids, scan, rope_scaling="none") - ref).max() > 100 * TOL
  assert np.abs(_unimm_logits(spec, params, ids, scan, rope_theta=1e4) - ref).max() > 100 * TOL


def test_llama_linear_rope_and_mistral_match_transformers(tmp_path):
  for kind, extra in (("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
                      ("mistral", {"sliding_window": 64, "num_key_value_heads": 1})):
    directory = str(tmp_path / kind)
    _save(kind, directory, seed=3, **extra)
    spec, params = llama.load(directory, seq_len=64, scan=True)
    ids = _ids(2)
    assert np.abs(_unimm_logits(spec, params, ids, True) - _reference_logits(directory, ids)).max() <= TOL


def test_qwen2_biases_tied_bfloat16_checkpoint(tmp_path):
  """Qwen2: q/k/v biases, tied embeddings, saved in bfloat16 (read from the raw bytes, no torch)."""
  directory = str(tmp_path / "qwen2")
  _save("qwen2", directory, seed=5, dtype=torch.bfloat16, tie_word_embeddings=True, rope_theta=1e6)
  reader = safetensors_io.CheckpointReader(directory)
  assert reader.dtype("model.embed_tokens.weight") == np.dtype(ml_dtypes.bfloat16)
  assert "lm_head.weight" not in reader  # tied: the head is the embedding
  spec, params = llama.load(directory, seq_len=64, scan=True)
  assert spec.backbone["qkv_bias"] and spec.tied_embeddings and spec.torch_dtype == "bfloat16"
  ids = _ids(3)
  ref = _reference_logits(directory, ids)  # the bf16 weights read back in float32, as ours
  assert np.abs(_unimm_logits(spec, params, ids, True) - ref).max() <= TOL
  no_bias = {**params, "decoder": {**params["decoder"], "layers": {**params["decoder"]["layers"]}}}
  attn = {k: {kk: vv for kk, vv in v.items() if kk != "bias"} for k, v in params["decoder"]["layers"]["attn"].items()}
  no_bias["decoder"]["layers"]["attn"] = attn
  assert np.abs(_unimm_logits(spec, no_bias, ids, True, qkv_bias=False) - ref).max() > 100 * TOL


def test_export_round_trip_same_tensors_and_logits(tmp_path):
  source, exported = str(tmp_path / "source"), str(tmp_path / "exported")
  _save("qwen2", source, seed=7, tie_word_embeddings=True)
  spec, params = llama.load(source, seq_len=64, scan=False)
  files = llama.save(params, spec, exported, scan=False, max_shard_bytes=60_000)  # forces a sharded export
  assert len(files) > 1 and os.path.exists(os.path.join(exported, safetensors_io.INDEX_FILE))
  a, b = safetensors_io.CheckpointReader(source), safetensors_io.CheckpointReader(exported)
  assert sorted(a.keys()) == sorted(b.keys())
  for name in a.keys():
    np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)
  ids = _ids(4)
  np.testing.assert_allclose(_reference_logits(exported, ids), _reference_logits(source, ids), atol=0, rtol=0)
  # A head trained away from the embedding is exported untied, not silently replaced by the embedding.
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] + 1.0
  llama.save(params, spec, str(tmp_path / "untied"), scan=False)
  with open(tmp_path / "untied" / "config.json") as f:
    assert json.load(f)["tie_word_embeddings"] is False
  assert np.abs(_reference_logits(str(tmp_path / "untied"), ids) - _unimm_logits(spec, params, ids, False)).max() <= TOL


@pytest.mark.parametrize("swin", [False, True])
def test_chameleon_language_model_matches_transformers(tmp_path, swin):
  """Chameleon's LM: QK-norm as a LayerNorm per head with its own weight and bias, optionally the Swin norm
  order; logits on a sequence mixing text ids and image-token ids (the VQ model is not read here)."""
  image_ids = {f"IMGIMG{''.join(chr(ord('A') + int(d)) for d in str(i))}Z": 40 + i for i in range(32)}
  config = transformers.ChameleonConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, swin_norm=swin, initializer_range=0.2, vocabulary_map={"<image>": 3, **image_ids},
      vq_config={"embed_dim": 8, "num_embeddings": 32, "latent_channels": 8, "resolution": 32, "base_channels": 32,
                 "channel_multiplier": [1, 2], "num_res_blocks": 1, "attn_resolutions": []})
  torch.manual_seed(0)
  model = transformers.ChameleonForConditionalGeneration(config).eval()
  _randomise(model, 0)  # the per-head QK LayerNorms' weights ≠ 1 and biases ≠ 0 too
  directory = str(tmp_path / "chameleon")
  model.save_pretrained(directory)
  spec, params = llama.load(directory, seq_len=64, scan=True)
  assert spec.backbone["qk_norm_kind"] == "head_layernorm" and spec.backbone["norm_order"] == ("swin" if swin else "pre")
  ids = np.concatenate([_ids(5, 8), 40 + np.random.default_rng(6).integers(0, 32, (2, 16)), _ids(7, 8)], axis=1)
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
  ours = _unimm_logits(spec, params, ids, True)
  text_columns = np.setdiff1d(np.arange(VOCAB), list(image_ids.values()))
  assert (ref[..., list(image_ids.values())] == np.finfo(np.float32).min).all()  # transformers masks image tokens
  assert np.abs(ours - ref)[..., text_columns].max() <= TOL
  ref = ref[..., text_columns]
  # unimm's own QK-norm (an RMSNorm shared by the heads) is a different function: it misses
  shared = {**params, "decoder": {"layers": {**params["decoder"]["layers"], "attn": {
      **params["decoder"]["layers"]["attn"], "q_norm": {"scale": np.ones((2, 16), np.float32)},
      "k_norm": {"scale": np.ones((2, 16), np.float32)}}}, "final_norm": params["decoder"]["final_norm"]}}
  assert np.abs(_unimm_logits(spec, shared, ids, True, qk_norm_kind="rms")[..., text_columns] - ref).max() > 100 * TOL


def test_refusals_name_the_problem(tmp_path):
  base = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              vocab_size=VOCAB)
  with pytest.raises(ValueError, match="'yarn' is not supported"):
    llama.read_spec({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, 64)
  with pytest.raises(ValueError, match="sliding_window=32 but seq_len=64"):
    llama.read_spec({**base, "model_type": "mistral", "sliding_window": 32}, 64)
  with pytest.raises(ValueError, match="'gpt2' is not a Llama-kind LM"):
    llama.read_spec({**base, "model_type": "gpt2"}, 64)
  with pytest.raises(ValueError, match="attention_bias"):
    llama.read_spec({**base, "attention_bias": True}, 64)
  directory = str(tmp_path / "llama")
  _save("llama", directory)
  reader = safetensors_io.CheckpointReader(directory)
  tensors = [(n, np.array(reader.get(n))) for n in reader.keys() if n != "model.layers.1.mlp.up_proj.weight"]
  os.remove(os.path.join(directory, "model.safetensors"))
  safetensors_io.write_file(os.path.join(directory, "model.safetensors"), tensors)
  with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
    llama.load(directory, seq_len=64)
