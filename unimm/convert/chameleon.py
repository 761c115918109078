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

import numpy as np

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


# The released tokenizer's image markers, mapped to unimm's roles where the tokenizer has them.
SPECIAL_TOKENS = {"boi": "<racm3:break>", "eoi": "<eoss>", "img": "<image>"}


def read_settings(hf: dict, seq_len: int) -> dict:
  """unimm's settings for a Chameleon config.json: the LM spec, `model.vq`, the image size, and the BPE ids of
  the codes (`code_ids[c]`, an array over the codebook)."""
  from unimm.convert import llama  # pylint: disable=g-import-not-at-top
  spec = llama.read_spec(hf, seq_len)
  vq = vq_settings(hf["vq_config"])
  codes = code_vocabulary(hf.get("vocabulary_map") or {})
  if sorted(codes) != list(range(vq["codebook_size"])):
    raise ValueError(f"Chameleon vocabulary_map names {len(codes)} image tokens (IMGIMG…Z) for a codebook of "
                     f"{vq['codebook_size']}: every code needs its BPE id")
  code_ids = np.array([codes[c] for c in range(vq["codebook_size"])], np.int64)
  if code_ids.max() - code_ids.min() + 1 != len(code_ids) or code_ids.max() >= spec.vocab_size:
    raise ValueError("Chameleon's image tokens are not one contiguous range of its vocabulary; unimm keeps "
                     "them out of text sampling as a range")
  return {"spec": spec, "vq": vq, "code_ids": code_ids, "image_size": int(hf["vq_config"]["resolution"]),
          "image_token_range": (int(code_ids.min()), int(code_ids.max()) + 1)}


def codes_into_vocabulary(params: dict, code_ids: np.ndarray, text_vocab: int) -> dict:
  """The LM's embedding and head in unimm's Chameleon layout: text ids [0, text_vocab) (rows the checkpoint
  lacks at the mean), then code c at `text_vocab + c`, its row the checkpoint's row of BPE id `code_ids[c]`
  (which also stays at its text id: never sampled as text, `image_token_range`)."""
  embedding, head = params["embed"]["embedding"], params["lm_head"]["kernel"]
  v = embedding.shape[0]
  if text_vocab < v:
    raise ValueError(f"text vocabulary {text_vocab} < the checkpoint's {v}")
  grown = np.concatenate([embedding, np.repeat(embedding.mean(0, keepdims=True), text_vocab - v, 0),
                          embedding[code_ids]], 0)
  grown_head = np.concatenate([head, np.repeat(head.mean(1, keepdims=True), text_vocab - v, 1), head[:, code_ids]], 1)
  return {**params, "embed": {"embedding": grown}, "lm_head": {"kernel": grown_head}}


def codes_out_of_vocabulary(params: dict, code_ids: np.ndarray, text_vocab: int, vocab: int) -> dict:
  """`codes_into_vocabulary`'s inverse: the checkpoint's `vocab` rows, each code's (trained) row at its BPE id."""
  embedding, head = np.asarray(params["embed"]["embedding"]), np.asarray(params["lm_head"]["kernel"])
  codes = text_vocab + np.arange(len(code_ids))
  out_embedding, out_head = embedding[:vocab].copy(), head[:, :vocab].copy()
  out_embedding[code_ids], out_head[:, code_ids] = embedding[codes], head[:, codes]
  return {**params, "embed": {"embedding": out_embedding}, "lm_head": {"kernel": out_head}}


def export_vq(vq_params: dict, levels: int):
  """(transformers name, float32 array) of what transformers' Chameleon VQ holds: the encoder, the quant
  convs and the codebook (it has no decoder; unimm's trained decoder is not exported)."""
  kept = {k: v for k, v in vq_params.items() if k != "decoder"}
  yield from vqgan.export_tensors(kept, PREFIX, levels)
