"""How closely converted checkpoints match their reference implementations: prints one JSON line of max
absolute differences per architecture (float32), on tiny random reference models made here.

    python bench/convert_agreement.py

Needs the test extras (torch, transformers, diffusers). The tests assert ≤ 1e-4 on the same kinds of
models (tests/test_convert_*.py); this reports the measured figures.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np
import torch
import transformers
import diffusers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from unimm.convert import diffusers_vae, llama, siglip  # noqa: E402  pylint: disable=wrong-import-position
from unimm.data import packed  # noqa: E402  pylint: disable=wrong-import-position
from unimm.models import autoencoders, backbone, text_lm, vit  # noqa: E402  pylint: disable=wrong-import-position

LM = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          vocab_size=160, initializer_range=0.2)


def _lm_diff(model, directory: str) -> float:
  model.save_pretrained(directory)
  spec, params = llama.load(directory, seq_len=64, scan=True)
  ids = np.random.default_rng(0).integers(0, 160, (2, 48))
  cfg = backbone.BackboneConfig(**spec.backbone, dtype="float32", remat="none", scan=True, attention="xla",
                                bidirectional_images=False)
  rows = packed.Rows(ids.astype(np.int32), np.broadcast_to(np.arange(48, dtype=np.int32), (2, 48)),
                     np.ones((2, 48), np.int32), np.zeros((2, 48), np.int32))
  ours = np.asarray(text_lm.TextLM(spec.vocab_size, cfg).apply({"params": params}, rows))
  with torch.no_grad():
    ref = model(torch.tensor(ids)).logits.numpy()
  finite = ref > np.finfo(np.float32).min  # transformers' Chameleon masks its image tokens' logits
  return float(np.abs(ours - ref)[finite].max())


def _janus(tmp: str) -> dict:
  """Janus: understanding logits (an image through SigLIP + aligner), generation-head logits over codes, VQ
  codes (fraction equal) and decodes, against transformers' JanusForConditionalGeneration."""
  sys.path.insert(0, os.path.join(REPO, "tests"))
  import hf_reference  # pylint: disable=g-import-not-at-top
  from unimm import families, main as unimm_main  # pylint: disable=g-import-not-at-top
  from unimm.convert import workdir  # pylint: disable=g-import-not-at-top
  from unimm.data import pipeline  # pylint: disable=g-import-not-at-top
  from unimm.train import config_record  # pylint: disable=g-import-not-at-top
  model, _, ids = hf_reference.tiny_janus(os.path.join(tmp, "hf"))
  workdir.import_janus(os.path.join(tmp, "hf"), os.path.join(tmp, "w"), seq_len=128)
  config = config_record.load_config(os.path.join(tmp, "w"))
  config.model.backbone.dtype = config.model.vision.dtype = "float32"
  task = families.build_task(config, pipeline.load_tokenizer(config.data).vocab_size,
                             frozen_codec=families.load_frozen_codec(config))
  params = unimm_main.starting_params(config, task)
  rng = np.random.default_rng(4)
  image = rng.integers(0, 256, (1, 32, 32, 3)).astype(np.uint8)
  pixels = torch.tensor(image.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
  codes = rng.integers(0, 64, 16)
  tokens = [ids["bos"], 17, ids["boi"]] + [ids["img"]] * 16 + [ids["eoi"], 40, ids["boi"]]
  written = tokens + [384 + int(c) for c in codes]
  t = len(written)
  image_ids = [int(x == ids["img"]) for x in tokens] + [2] * 16
  rows = packed.Rows(np.array([written], np.int32), np.arange(t, dtype=np.int32)[None], np.ones((1, t), np.int32),
                     np.array([image_ids], np.int32))
  ours = np.asarray(task.model.apply({"params": params}, rows, np.stack([image, image], 1)))[0]
  with torch.no_grad():
    embeds = model.get_input_embeddings()(torch.tensor([tokens]))
    embeds[0, 3:19] = model.model.get_image_features(pixels).pooler_output[0]
    embeds = torch.cat([embeds, model.prepare_embeddings_for_image_generation(torch.tensor(codes[None]))], 1)
    hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
    text_logits, code_logits = model.lm_head(hidden)[0].numpy(), model.model.generation_head(hidden)[0].numpy()
    images = rng.integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
    ref_codes = model.model.vqmodel.encode(torch.tensor(images.astype(np.float32) / 127.5 - 1).permute(
        0, 3, 1, 2)).image_tokens.reshape(4, -1).numpy()
    ref_pixels = model.model.vqmodel.decode(torch.tensor(ref_codes)).permute(0, 2, 3, 1).numpy()
  vq, vq_params = task.codes.tokenizer, task.codes.params
  our_codes = np.asarray(vq.apply({"params": vq_params}, images, method=vq.encode)).reshape(4, -1)
  decoded = np.asarray(vq.apply({"params": vq_params}, ref_codes.reshape(4, 4, 4), method=vq.decode_codes))
  return {"janus_text_logits_with_image": float(np.abs(ours[:, :384] - text_logits).max()),
          "janus_generation_head_logits": float(np.abs(ours[:, 384:] - code_logits).max()),
          "janus_vq_codes_equal_fraction": float((our_codes == ref_codes).mean()),
          "janus_vq_decode": float(np.abs(decoded - ref_pixels).max())}


def main():
  torch.manual_seed(0)
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    out["llama_gqa_llama3_rope"] = _lm_diff(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **LM, rope_theta=5e5, rope_scaling=rope)).eval(), os.path.join(tmp, "llama"))
    out["mistral"] = _lm_diff(transformers.MistralForCausalLM(transformers.MistralConfig(**LM)).eval(),
                              os.path.join(tmp, "mistral"))
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**LM, tie_word_embeddings=True)).eval()
    with torch.no_grad():
      for name, p in qwen.named_parameters():
        if name.endswith("bias"):
          p.copy_(0.5 * torch.randn(p.shape))
    out["qwen2_bias_tied"] = _lm_diff(qwen, os.path.join(tmp, "qwen2"))
    image_ids = {f"IMGIMG{''.join(chr(ord('A') + int(d)) for d in str(i))}Z": 40 + i for i in range(32)}
    chameleon = transformers.ChameleonForConditionalGeneration(transformers.ChameleonConfig(
        **LM, vocabulary_map={"<image>": 3, **image_ids},
        vq_config={"embed_dim": 8, "num_embeddings": 32, "latent_channels": 8, "resolution": 32, "base_channels": 32,
                   "channel_multiplier": [1, 2], "num_res_blocks": 1, "attn_resolutions": []})).eval()
    out["chameleon_lm_qk_layernorm"] = _lm_diff(chameleon, os.path.join(tmp, "chameleon"))

    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    pixels = torch.tensor(images.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    tower = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8)).eval()
    tower.save_pretrained(os.path.join(tmp, "siglip"))
    settings, params = siglip.load(os.path.join(tmp, "siglip"))
    cfg = siglip.vit_config(settings, dtype="float32", remat=False)
    features = vit.ViT(cfg).apply({"params": params["image_encoder"]}, images)
    with torch.no_grad():
      ref = tower(pixel_values=pixels)
    out["siglip_features"] = float(np.abs(np.asarray(features) - ref.last_hidden_state.numpy()).max())
    pooled = vit.MAPHead(cfg.num_heads, cfg.mlp_dim, np.float32).apply({"params": params["map_head"]}, features)
    out["siglip_pooled"] = float(np.abs(np.asarray(pooled) - ref.pooler_output.numpy()).max())

    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                  scaling_factor=0.3, shift_factor=0.1).eval()
    vae.save_pretrained(os.path.join(tmp, "vae"))
    settings, params = diffusers_vae.load(os.path.join(tmp, "vae"))
    ours = autoencoders.KLVAE(autoencoders.AutoencoderConfig(**settings), 3)
    mean, _ = ours.apply({"params": params}, images, method=ours.posterior)
    with torch.no_grad():
      ref_mean = vae.encode(pixels).latent_dist.mean
      ref_decoded = vae.decode(ref_mean).sample.permute(0, 2, 3, 1).numpy()
    decoded = ours.apply({"params": params}, (ref_mean.permute(0, 2, 3, 1).numpy() - 0.1) * 0.3, method=ours.decode)
    out["autoencoder_kl_latent_mean"] = float(np.abs(np.asarray(mean) - ref_mean.permute(0, 2, 3, 1).numpy()).max())
    out["autoencoder_kl_decode"] = float(np.abs(np.asarray(decoded) - ref_decoded).max())
    out.update(_janus(os.path.join(tmp, "janus")))
  print(json.dumps({k: float(f"{v:.3g}") for k, v in out.items()}))


if __name__ == "__main__":
  main()
