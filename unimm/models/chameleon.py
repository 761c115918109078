"""Chameleon (arXiv 2405.09818): images as discrete VQ codes in the text vocabulary, next-token on everything.

The vocabulary is the text tokenizer's ids followed by a reserved range of
`codebook_size` image codes (8192 in the paper): code c is token
`text_vocab + c`. A packed row keeps the layout every family shares (`BOI`,
one slot per code in raster order, `EOI`); inside the step the frozen VQ
tokenizer turns the row's images into codes, which fill the image slots as
tokens (`unimm.models.code_images`, the part shared with Janus). One backbone and one LM head then do next-token
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

from unimm.data import packed
from unimm.models import code_images, text_lm


class ChameleonModel(text_lm.TextLM):
  """The text model over the joint vocabulary (text ids + image codes): `vocab_size` counts both."""

  max_images: int = 1
  slots: int = 0  # codes per image

  def setup(self):
    if self.backbone.bidirectional_images:
      raise ValueError("Chameleon predicts image codes left to right: set config.model.backbone."
                       "bidirectional_images=False (attention must stay causal inside images).")
    super().setup()


@dataclasses.dataclass
class ChameleonTask:
  """The Chameleon family for the trainer and the generators."""

  model: ChameleonModel
  codes: code_images.CodeImages  # the frozen image tokenizer; code c is token codes.text_vocab + c
  z_loss: float = 0.0
  tokenizer_ids: int = 0  # ids the text tokenizer emits; [tokenizer_ids, text_vocab) is padding, never sampled
  image_token_range: tuple[int, int] = (0, 0)  # text ids that are a converted checkpoint's image tokens: never text

  def __post_init__(self):
    c = self.codes
    if self.model.vocab_size != c.text_vocab + c.codebook_size:
      raise ValueError(f"Chameleon vocabulary {self.model.vocab_size} != text {c.text_vocab} + codes {c.codebook_size}")
    if self.model.slots != c.codes_per_image:
      raise ValueError(f"data.image_slots={self.model.slots} but the tokenizer gives "
                       f"{c.codes_per_image} codes per {c.image_shape} image")

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.codes.image_shape

  def dummy_batch(self, batch_size: int, seq_len: int, image_shape) -> dict:
    return packed.example_batch(batch_size, seq_len, self.model.max_images, image_shape)

  def init(self, rng, batch: dict):
    return self.model.init(rng, packed.Rows.of(batch))["params"]

  def row_tokens(self, rows: packed.Rows, images):
    """The rows' tokens with their images' codes in the image slots."""
    return self.codes.fill_slots(rows.tokens, rows.image_ids, images)

  def model_inputs(self, rows: packed.Rows, images) -> tuple:
    """The model's inputs for rows (packed, or prompts) and their images [B, M, H, W, C] (every image, read
    or written, is codes in its slots)."""
    return (rows.replace(tokens=self.row_tokens(rows, images)),)

  def batch_inputs(self, batch: dict) -> tuple:
    """The model's inputs for a packed batch."""
    return self.model_inputs(packed.Rows.of(batch), batch["images"])

  def unconditional_prompt(self, length: int, specials) -> list[int]:
    """The guidance twin of a prompt ending in BOI: `[BOS, BOI]` (trained by dropping the caption)."""
    del length
    return [specials.bos, specials.boi]

  def logits(self, params, batch: dict, rng=None):
    """Next-token logits of packed rows [B, T, V]; `rng` turns dropout on (training)."""
    return self.model.apply({"params": params}, *self.batch_inputs(batch),
                            rngs=None if rng is None else {"dropout": rng})

  def image_logits(self, params, batch: dict):
    """The logits over image codes [B, T, codebook] (the joint head's code range)."""
    return self.logits(params, batch)[..., self.codes.text_vocab:self.codes.text_vocab + self.codes.codebook_size]

  def loss_terms(self, params, batch: dict, rng, step=0) -> dict:
    del step
    (rows,) = self.batch_inputs(batch)
    logits = self.model.apply({"params": params}, rows, rngs={"dropout": rng})[:, :-1]
    targets = rows.tokens[:, 1:]  # one head over the joint vocabulary scores text and codes alike
    return code_images.split_loss_terms(batch, logits, targets, logits, targets, self.z_loss)

  loss_counts = staticmethod(code_images.split_loss_counts)
  combine = staticmethod(code_images.split_combine)
