"""The text model every family contains: token embedding → backbone → LM head, under the same param names
(`embed`, `decoder`, `lm_head`) as in Transfusion, Chameleon and Janus, so a text LM's params (trained on
text, or converted from Hugging Face by `unimm.convert`) graft into any family's as they are.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from unimm.data import packed
from unimm.models import axes, backbone, layers


class TextLM(nn.Module):
  vocab_size: int
  backbone: backbone.BackboneConfig
  decode: bool = False

  def setup(self):
    c = self.backbone
    self.embed = layers.Embed(self.vocab_size, c.dim, dtype=c.compute_dtype)
    self.decoder = backbone.Backbone(c, decode=self.decode)
    self.lm_head = layers.DenseGeneral((self.vocab_size,), (axes.EMBED,), (axes.VOCAB,), dtype=c.compute_dtype,
                                       out_dtype=jnp.float32)

  def dummy_inputs(self, batch: int, length: int) -> tuple:
    return (packed.Rows.one_document(batch, length),)

  def __call__(self, rows: packed.Rows):
    """Rows → next-token logits [B, T, V] (float32)."""
    h = self.decoder(self.embed(rows.tokens), rows.positions, rows.segment_ids, rows.image_ids)
    return layers.constrain(self.lm_head(h), (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_VOCAB))
