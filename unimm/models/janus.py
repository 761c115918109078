"""Janus / Janus-Pro (arXiv 2410.13848, 2501.17811): one autoregressive transformer, decoupled visual encoders.

An image the model *reads* (`image_written` False: it conditions later text)
goes through a SigLIP-style ViT (`unimm.models.vit`, pretrained with family
`siglip`); its feature grid, through the understanding adaptor (Linear → GELU →
Linear), fills the image's slots. An image the model *writes* is turned into
codes by the frozen VQ tokenizer (`unimm.models.code_images`, as Chameleon's); each
code's embedding (initialised from the tokenizer's codebook) goes through the
generation adaptor (Linear → GELU → Linear) into the sequence, and a separate
image head (Linear → GELU → Linear to the codebook) predicts the next code,
while text keeps the LM head. Loss: cross-entropy on text targets (LM head,
softmax over the text vocabulary) and on written images' codes (image head,
softmax over the codebook), summed and divided by their total count, no task
weights (as the papers).

For the KV-cached generators (`unimm.inference.codes`, shared with
Chameleon) the model speaks Chameleon's interface: ids ≥ `text_vocab` are
codes (`text_vocab + c`) and the logits are the LM head's and the image head's
side by side, [B, T, text_vocab + codebook]; the samplers mask one side or the
other. Janus trains its unconditional case by replacing the prompt with PAD
(`data.caption_dropout_mode="pad"`), so its guidance twin is the prompt with
every token but BOS replaced by PAD (`unconditional_prompt`).

The training stages (adaptors + image head; + the LLM; + the ViT) are configs
naming what trains (`config.train.trainable`, see `unimm.train.step`).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from unimm.data import packed
from unimm.models import axes, backbone, code_images, layers, slots, vit as vit_lib, vq

_named = nn.with_logical_partitioning


class Adaptor(nn.Module):
  """Linear → GELU → Linear to the model width (Janus's aligners and image head)."""

  hidden: int
  features: int
  dtype: jnp.dtype
  out_name: str = axes.EMBED
  out_dtype: jnp.dtype | None = None  # float32 for the image head (logits), as the LM head's
  gelu_exact: bool = False  # erf GELU (DeepSeek's nn.GELU(), transformers' "gelu"); default: tanh approximation

  @nn.compact
  def __call__(self, x):
    h = layers.dense(self.hidden, axes.EMBED_IN, axes.MLP, dtype=self.dtype, name="fc1")(x.astype(self.dtype))
    return layers.dense(self.features, axes.MLP, self.out_name, dtype=self.dtype, out_dtype=self.out_dtype,
                        name="fc2")(nn.gelu(h, approximate=not self.gelu_exact))


class JanusModel(nn.Module):
  text_vocab: int
  codebook_size: int
  code_dim: int
  backbone: backbone.BackboneConfig
  vision: vit_lib.ViTConfig
  max_images: int
  slots: int  # slots per image: the ViT's patches = the tokenizer's codes
  image_shape: tuple[int, int, int] = (384, 384, 3)
  decode: bool = False
  adaptor_gelu_exact: bool = False  # the aligners' and image head's GELU (config.model.adaptor_gelu_exact)

  @property
  def vocab_size(self) -> int:
    return self.text_vocab + self.codebook_size

  def setup(self):
    c = self.backbone
    if c.bidirectional_images:
      raise ValueError("Janus predicts image codes left to right: set config.model.backbone."
                       "bidirectional_images=False.")
    dt = c.compute_dtype
    self.embed = layers.Embed(self.text_vocab, c.dim, dtype=dt)
    self.vision_encoder = vit_lib.ViT(self.vision)
    exact = self.adaptor_gelu_exact
    self.und_aligner = Adaptor(c.dim, c.dim, dt, gelu_exact=exact)
    self.gen_embed = self.param("gen_embed", _named(nn.initializers.normal(1.0), (axes.CODES, axes.CODE_DIM)),
                                (self.codebook_size, self.code_dim), jnp.float32)
    self.gen_aligner = Adaptor(c.dim, c.dim, dt, gelu_exact=exact)
    self.decoder = backbone.Backbone(c, decode=self.decode)
    self.lm_head = layers.DenseGeneral((self.text_vocab,), (axes.EMBED,), (axes.VOCAB,), dtype=dt,
                                       out_dtype=jnp.float32)
    self.gen_head = Adaptor(c.dim, self.codebook_size, dt, out_name=axes.VOCAB, out_dtype=jnp.float32,
                           gelu_exact=exact)

  def dummy_inputs(self, batch: int, length: int) -> tuple:
    return packed.Rows.one_document(batch, length), jnp.zeros((batch, self.max_images, *self.image_shape), jnp.uint8)

  def read_embeddings(self, images, image_ids):
    """uint8 images [B, M, H, W, C] → [B, T, D]: at each slot of image k, its ViT feature's adaptor output."""
    b, m = images.shape[:2]
    feats = self.vision_encoder(images.reshape(b * m, *images.shape[2:]))  # [B·M, P, F]
    p = feats.shape[1]
    if p != self.slots:
      raise ValueError(f"the ViT gives {p} patches per image but images have {self.slots} slots")
    emb = self.und_aligner(feats.reshape(b, m * p, -1))
    return slots.values_at_slots(emb.reshape(b, m, p, -1), image_ids)

  def __call__(self, rows: packed.Rows, images=None):
    """rows.tokens: text ids, codes as `text_vocab + c` at written slots, anything at read slots (which take
    `images`' ViT features; without `images` no slot is read). → logits [B, T, text_vocab + codebook]."""
    tokens, image_ids = rows.tokens, rows.image_ids
    is_code = tokens >= self.text_vocab
    x = self.embed(jnp.where(is_code, 0, tokens))
    codes = jnp.clip(tokens - self.text_vocab, 0, self.codebook_size - 1)
    x = jnp.where(is_code[..., None], self.gen_aligner(self.gen_embed[codes]).astype(x.dtype), x)
    if images is not None:
      read = (image_ids > 0) & ~is_code
      x = jnp.where(read[..., None], self.read_embeddings(images, image_ids).astype(x.dtype), x)
    h = self.decoder(x, rows.positions, rows.segment_ids, image_ids)
    logits = jnp.concatenate([self.lm_head(h), self.gen_head(h)], -1)
    return layers.constrain(logits, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_VOCAB))


def written_slots(image_ids, image_written):
  """bool [B, T]: slots of images the row writes."""
  k = jnp.clip(image_ids - 1, 0, image_written.shape[1] - 1)
  return (image_ids > 0) & jnp.take_along_axis(image_written, k, axis=1)


@dataclasses.dataclass
class JanusTask:
  """The Janus family for the trainer and the code generators (`unimm.inference.codes`, with Chameleon)."""

  model: JanusModel
  codes: code_images.CodeImages  # the frozen image tokenizer for images the model writes
  z_loss: float = 0.0
  tokenizer_ids: int = 0  # ids the text tokenizer emits; [tokenizer_ids, text_vocab) is padding, never sampled

  def __post_init__(self):
    if self.model.codebook_size != self.codes.codebook_size:
      raise ValueError(f"model codebook {self.model.codebook_size} != tokenizer's {self.codes.codebook_size}")
    codes, patches = self.codes.codes_per_image, self.model.vision.num_patches(self.image_shape)
    if not self.model.slots == codes == patches:
      raise ValueError(f"data.image_slots={self.model.slots}, but the tokenizer gives {codes} codes and the ViT "
                       f"{patches} patches per {self.image_shape} image: all three must agree")

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.codes.image_shape

  def dummy_batch(self, batch_size: int, seq_len: int, image_shape) -> dict:
    return packed.example_batch(batch_size, seq_len, self.model.max_images, image_shape)

  def init(self, rng, batch: dict):
    params = self.model.init(rng, packed.Rows.of(batch), batch["images"])["params"]
    return {**params, "gen_embed": params["gen_embed"].replace_boxed(self.codes.codebook())}

  def row_tokens(self, rows: packed.Rows, images, image_written=None):
    """The rows' tokens with written images' codes in their slots (read images' slots keep IMG)."""
    if image_written is None:  # prompts: every image in them is read
      return rows.tokens
    tokens = self.codes.fill_slots(rows.tokens, rows.image_ids, images)
    return jnp.where(written_slots(rows.image_ids, image_written), tokens, rows.tokens)

  def model_inputs(self, rows: packed.Rows, images, image_written=None) -> tuple:
    """The model's inputs for rows (packed, or prompts: `image_written` None) and their images."""
    return rows.replace(tokens=self.row_tokens(rows, images, image_written)), images

  def batch_inputs(self, batch: dict) -> tuple:
    """The model's inputs for a packed batch."""
    return self.model_inputs(packed.Rows.of(batch), batch["images"], batch.get("image_written"))

  def logits(self, params, batch: dict, rng=None):
    """The LM head's next-token logits of packed rows [B, T, text_vocab] (text targets: perplexity)."""
    del rng
    return self.model.apply({"params": params}, *self.batch_inputs(batch))[..., :self.model.text_vocab]

  def image_logits(self, params, batch: dict):
    """The generation head's logits over image codes [B, T, codebook]."""
    return self.model.apply({"params": params}, *self.batch_inputs(batch))[..., self.model.text_vocab:]

  def loss_terms(self, params, batch: dict, rng, step=0) -> dict:
    del step
    rows, images = self.batch_inputs(batch)
    logits = self.model.apply({"params": params}, rows, images, rngs={"dropout": rng})[:, :-1]
    targets = rows.tokens[:, 1:]
    v = self.model.text_vocab  # text targets score the LM head's side, code targets the image head's
    return code_images.split_loss_terms(batch, logits[..., :v], jnp.clip(targets, 0, v - 1), logits[..., v:],
                                        jnp.clip(targets - v, 0, self.codes.codebook_size - 1), self.z_loss)

  loss_counts = staticmethod(code_images.split_loss_counts)
  combine = staticmethod(code_images.split_combine)

  def unconditional_prompt(self, length: int, specials) -> list[int]:
    """The guidance twin of a `length`-token prompt ending in BOI: BOS, PAD…, BOI (trained by PAD dropout)."""
    return [specials.bos] + [specials.pad] * (length - 2) + [specials.boi]


def vision_params(restored):
  """A family-siglip checkpoint's params → the ViT's (Janus's `vision_encoder`)."""
  if "image_encoder" not in restored:
    raise ValueError(f"not a SigLIP checkpoint: its params hold {sorted(restored)}, no 'image_encoder'")
  return restored["image_encoder"]


def build(config, text_vocab: int, frozen_tokenizer, image_shape, tokenizer_ids: int | None = None) -> JanusTask:
  m, d = config.model, config.data
  cfg = vq.VQConfig.from_config(m.vq)
  model = JanusModel(text_vocab=text_vocab, codebook_size=cfg.codebook_size, code_dim=cfg.code_dim,
                     backbone=backbone.BackboneConfig.from_config(m.backbone),
                     vision=vit_lib.ViTConfig.from_config(m.vision), max_images=int(d.max_images_per_row),
                     slots=int(d.image_slots), image_shape=tuple(image_shape),
                     adaptor_gelu_exact=bool(m.get("adaptor_gelu_exact", False)))
  codes = code_images.CodeImages(vq.VQModel(cfg, image_shape[-1]), frozen_tokenizer, text_vocab, tuple(image_shape))
  return JanusTask(model=model, codes=codes, z_loss=float(m.z_loss), tokenizer_ids=tokenizer_ids or 0)
