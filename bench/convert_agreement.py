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
  print(json.dumps({k: float(f"{v:.3g}") for k, v in out.items()}))


if __name__ == "__main__":
  main()
