"""Chameleon's VQGAN (`ChameleonForConditionalGeneration`'s `model.vqmodel`) → unimm's VQ tokenizer, and
its vocabulary map (the BPE ids of its image tokens ↔ codes). The language model converts with
`unimm.convert.llama` (QK-norm per head, Swin order).

The tokenizer is unimm's `VQModel` with Chameleon's switches (`model.vq`): `l2_normalized=False` (an
unnormalised Euclidean codebook), `norm_groups=32`, `attention_levels` (attention after the blocks of the
levels whose resolution is in `attn_resolutions`), layout "taming". transformers ships only its encoder
and quantiser (`quant_conv` → codebook, `post_quant_conv`): those convert (names: `unimm.convert.vqgan`),
and the decoder — which the reference implementation does not have — is left to unimm's training (`family
vq` with `train.trainable=("decoder", "post_quant_proj")`).
"""

from __future__ import annotations

from unimm.convert import vqgan

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
              code_dim=int(vq["embed_dim"]), l2_normalized=False, norm_groups=32, layout="taming",
              attention_levels=tuple(i for i in range(len(mults)) if resolution // 2 ** i in attn))


def code_vocabulary(vocabulary_map: dict) -> dict[int, int]:
  """{code: BPE id} from Chameleon's vocabulary map, whose image tokens are named IMGIMG<digits as A–J>Z."""
  out = {}
  for name, token_id in vocabulary_map.items():
    if name.startswith("IMGIMG") and name.endswith("Z"):
      out[int("".join(str(ord(c) - ord("A")) for c in name[len("IMGIMG"):-1]))] = int(token_id)
  return out


def import_vq(reader, levels: int) -> dict:
  """The VQ tokenizer's encoder, projections and codebook (float32 NumPy) from a Chameleon checkpoint
  (`levels`: len(channel_multiplier))."""
  return vqgan.import_params(reader, PREFIX, levels, parts=("encoder",))
