"""Chameleon (arXiv 2405.09818): images as discrete VQ codes in the text vocabulary, next-token on everything.

The vocabulary is the text tokenizer's ids followed by a reserved range of
`codebook_size` image codes (8192 in the paper): code c is token
`text_vocab + c`. A packed row keeps the layout every family shares (`BOI`,
one slot per code in raster order, `EOI`); inside the step the frozen VQ
tokenizer (`unimm.models.vq`) turns the row's images into codes, which fill
the image slots as tokens. One backbone and one LM head then do next-token
prediction over the whole row with the layout's loss weights
(`data.image_token_weight` > 0 trains the codes). Attention is plain causal:
the family switches the attention rule's (docs/design.md) intra-image bidirectionality off
(`backbone.bidirectional_images = False`), since codes are predicted in order.

The paper's stability measures are switches: QK-norm, dropout and the
Swin-style norm order (`unimm.models.backbone`), and the z-loss
(`model.z_loss`, 1e-5·log²Z).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm.data import packed
from unimm.models import autoencoders, axes, backbone, layers, losses, slots, vq


class ChameleonModel(nn.Module):
  vocab_size: int  # text ids + image codes
  backbone: backbone.BackboneConfig
  max_images: int
  slots: int  # codes per image
  decode: bool = False  # run the backbone through its KV cache (inference)

  def setup(self):
    c = self.backbone
    if c.bidirectional_images:
      raise ValueError("Chameleon predicts image codes left to right: set config.model.backbone."
                       "bidirectional_images=False (attention must stay causal inside images).")
    self.embed = layers.Embed(self.vocab_size, c.dim, dtype=c.compute_dtype)
    self.decoder = backbone.Backbone(c, decode=self.decode)
    self.lm_head = layers.DenseGeneral((self.vocab_size,), (axes.EMBED,), (axes.VOCAB,), dtype=c.compute_dtype,
                                       out_dtype=jnp.float32)

  def dummy_inputs(self, batch: int, length: int) -> tuple:
    ids = jnp.zeros((batch, length), jnp.int32)
    return ids, ids, ids, ids

  def __call__(self, tokens, positions, segment_ids, image_ids):
    """Token ids (codes already in the image slots) → logits [B, T, V] (float32)."""
    h = self.decoder(self.embed(tokens), positions, segment_ids, image_ids)
    return layers.constrain(self.lm_head(h), (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_VOCAB))


def place_codes(tokens, image_ids, code_tokens):
  """tokens [B, T] with image slot s of image k replaced by code_tokens [B, M, P][k-1, s]."""
  return slots.scatter(tokens, code_tokens, image_ids)


@dataclasses.dataclass
class ChameleonTask:
  """The Chameleon family for the trainer and the generators."""

  model: ChameleonModel
  tokenizer: vq.VQModel  # the frozen image tokenizer
  frozen_tokenizer: Any  # its params
  text_vocab: int  # image code c is token text_vocab + c
  image_shape: tuple[int, int, int]
  z_loss: float = 0.0
  tokenizer_ids: int = 0  # ids the text tokenizer emits; [tokenizer_ids, text_vocab) is padding, never sampled

  def __post_init__(self):
    k = self.tokenizer.cfg.codebook_size
    if self.model.vocab_size != self.text_vocab + k:
      raise ValueError(f"Chameleon vocabulary {self.model.vocab_size} != text {self.text_vocab} + codes {k}")
    if self.model.slots != self.tokenizer.cfg.num_codes(self.image_shape):
      raise ValueError(f"data.image_slots={self.model.slots} but the tokenizer gives "
                       f"{self.tokenizer.cfg.num_codes(self.image_shape)} codes per {self.image_shape} image")

  @property
  def codebook_size(self) -> int:
    return self.tokenizer.cfg.codebook_size

  def dummy_batch(self, batch_size: int, seq_len: int, image_shape) -> dict:
    return packed.example_batch(batch_size, seq_len, self.model.max_images, image_shape)

  def init(self, rng, batch: dict):
    return self.model.init(rng, batch["tokens"], batch["positions"], batch["segment_ids"],
                           batch["image_ids"])["params"]

  def code_tokens(self, images):
    """uint8 images [B, M, H, W, C] → their code tokens [B, M, P] (raster order, offset into the vocabulary)."""
    b, m = images.shape[:2]
    codes = self.tokenizer.apply({"params": self.frozen_tokenizer}, images.reshape(b * m, *images.shape[2:]),
                                 method=vq.VQModel.encode)
    return jax.lax.stop_gradient(codes.reshape(b, m, -1) + self.text_vocab).astype(jnp.int32)

  def row_tokens(self, batch: dict):
    """The row's tokens with its images' codes in the image slots."""
    return place_codes(batch["tokens"], batch["image_ids"], self.code_tokens(batch["images"]))

  def model_inputs(self, batch: dict) -> tuple:
    """The model's positional inputs for packed rows (or prompt rows)."""
    return self.row_tokens(batch), batch["positions"], batch["segment_ids"], batch["image_ids"]

  def unconditional_prompt(self, length: int, specials) -> list[int]:
    """The guidance twin of a prompt ending in BOI: `[BOS, BOI]` (trained by dropping the caption)."""
    del length
    return [specials.bos, specials.boi]

  def logits(self, params, batch: dict, rng=None):
    """Next-token logits of packed rows [B, T, V]; `rng` turns dropout on (training)."""
    return self.model.apply({"params": params}, self.row_tokens(batch), batch["positions"], batch["segment_ids"],
                            batch["image_ids"], rngs=None if rng is None else {"dropout": rng})

  def loss_terms(self, params, batch: dict, rng, step=0) -> dict:
    del step
    tokens = self.row_tokens(batch)
    logits = self.model.apply({"params": params}, tokens, batch["positions"], batch["segment_ids"],
                              batch["image_ids"], rngs={"dropout": rng})
    weights = batch["loss_weights"][:, :-1]
    is_code = (batch["image_ids"][:, 1:] > 0).astype(jnp.float32)
    targets = tokens[:, 1:]
    text_ce, z_text = losses.cross_entropy(logits[:, :-1], targets, weights * (1.0 - is_code), self.z_loss)
    image_ce, z_image = losses.cross_entropy(logits[:, :-1], targets, weights * is_code, self.z_loss)
    return {"text": text_ce, "image": image_ce, "z": z_text + z_image}

  @staticmethod
  def loss_counts(batch: dict) -> dict:
    weights = batch["loss_weights"][:, :-1]
    is_code = (batch["image_ids"][:, 1:] > 0).astype(jnp.float32)
    return {"text": jnp.sum(weights * (1.0 - is_code)), "image": jnp.sum(weights * is_code)}

  def combine(self, sums: dict, counts: dict) -> tuple[jnp.ndarray, dict]:
    """One next-token loss over every weighted target (the paper: no modality weights)."""
    n = jnp.maximum(counts["text"] + counts["image"], 1.0)
    total = (sums["text"] + sums["image"] + sums["z"]) / n
    return total, {"lm_loss": (sums["text"] + sums["image"]) / n,
                   "text_loss": sums["text"] / jnp.maximum(counts["text"], 1.0),
                   "image_loss": sums["image"] / jnp.maximum(counts["image"], 1.0), "z_loss": sums["z"] / n}

  def decode_codes(self, code_tokens):
    """Code tokens [N, P] (offset into the vocabulary) → uint8 images [N, H, W, C]."""
    gh, gw = self.tokenizer.cfg.grid(self.image_shape)
    codes = (jnp.asarray(code_tokens) - self.text_vocab).reshape(-1, gh, gw)
    pixels = self.tokenizer.apply({"params": self.frozen_tokenizer}, codes, method=vq.VQModel.decode_codes)
    return autoencoders.to_uint8(pixels)


def frozen_tokenizer_params(restored):
  """The tokenizer's params from a family-vq checkpoint's params (which may hold a discriminator too)."""
  return restored["vq"] if "vq" in restored else restored
