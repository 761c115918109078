"""Images as VQ codes in the vocabulary: the part the code families (Chameleon, Janus) compose.

A frozen VQ tokenizer (`unimm.models.vq`) turns a row's images into codes;
code c is token `text_vocab + c`, so codes sit in the image slots as tokens
(`CodeImages.fill_slots`) and the generators' drawn code tokens decode back to
pixels (`CodeImages.decode`). The loss splits next-token cross-entropy into
text targets and code targets (`split_loss_terms`), summed and divided by
their total count with no modality weights (`split_combine`, as both papers);
each family says which logits score which side (Chameleon: one head over the
joint vocabulary; Janus: its LM head and image head).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from unimm.models import autoencoders, losses, slots, vq


@dataclasses.dataclass(frozen=True)
class CodeImages:
  """The frozen image tokenizer with its params, and where its codes sit in the vocabulary."""

  tokenizer: vq.VQModel
  params: Any
  text_vocab: int  # code c is token text_vocab + c
  image_shape: tuple[int, int, int]

  @property
  def codebook_size(self) -> int:
    return self.tokenizer.cfg.codebook_size

  @property
  def codes_per_image(self) -> int:
    return self.tokenizer.cfg.num_codes(self.image_shape)

  def encode(self, images):
    """uint8 images [B, M, H, W, C] → their code tokens [B, M, P] (raster order, offset into the vocabulary)."""
    b, m = images.shape[:2]
    codes = self.tokenizer.apply({"params": self.params}, images.reshape(b * m, *images.shape[2:]),
                                 method=vq.VQModel.encode)
    return jax.lax.stop_gradient(codes.reshape(b, m, -1) + self.text_vocab).astype(jnp.int32)

  def fill_slots(self, tokens, image_ids, images):
    """tokens [B, T] with the slots of image k holding image k's code tokens."""
    return slots.scatter(tokens, self.encode(images), image_ids)

  def decode(self, code_tokens):
    """Code tokens [N, P] (offset into the vocabulary) → uint8 images [N, H, W, C]."""
    gh, gw = self.tokenizer.cfg.grid(self.image_shape)
    codes = (jnp.asarray(code_tokens) - self.text_vocab).reshape(-1, gh, gw)
    pixels = self.tokenizer.apply({"params": self.params}, codes, method=vq.VQModel.decode_codes)
    return autoencoders.to_uint8(pixels)

  def codebook(self):
    """The code vectors [K, code_dim] as the tokenizer looks codes up (L2-normalised if it normalises)."""
    book = self.params["quantizer"]["codebook"]
    if self.tokenizer.cfg.l2_normalized:
      book = book / jnp.linalg.norm(book, axis=-1, keepdims=True).clip(1e-6)
    return jnp.asarray(book, jnp.float32)


def tokenizer_params(restored):
  """The tokenizer's params from a family-vq checkpoint's params (which may hold a discriminator too)."""
  return restored["vq"] if "vq" in restored else restored


def _code_targets(batch: dict):
  """float [B, T-1]: 1 where the next token is an image slot's code."""
  return (batch["image_ids"][:, 1:] > 0).astype(jnp.float32)


def split_loss_terms(batch: dict, text_logits, text_targets, code_logits, code_targets, z_loss: float) -> dict:
  """Summed cross-entropies of the text targets and the code targets of packed rows (logits and targets
  already shifted: position t predicts t+1), with the loss weights of the row's layout."""
  weights = batch["loss_weights"][:, :-1]
  is_code = _code_targets(batch)
  text_ce, z_text = losses.cross_entropy(text_logits, text_targets, weights * (1.0 - is_code), z_loss)
  code_ce, z_code = losses.cross_entropy(code_logits, code_targets, weights * is_code, z_loss)
  return {"text": text_ce, "image": code_ce, "z": z_text + z_code}


def split_loss_counts(batch: dict) -> dict:
  weights = batch["loss_weights"][:, :-1]
  is_code = _code_targets(batch)
  return {"text": jnp.sum(weights * (1.0 - is_code)), "image": jnp.sum(weights * is_code)}


def split_combine(sums: dict, counts: dict) -> tuple[jnp.ndarray, dict]:
  """One next-token loss over every weighted target (no modality weights), and its parts."""
  n = jnp.maximum(counts["text"] + counts["image"], 1.0)
  total = (sums["text"] + sums["image"] + sums["z"]) / n
  return total, {"lm_loss": (sums["text"] + sums["image"]) / n,
                 "text_loss": sums["text"] / jnp.maximum(counts["text"], 1.0),
                 "image_loss": sums["image"] / jnp.maximum(counts["image"], 1.0), "z_loss": sums["z"] / n}
