"""A SigLIP-style ViT image encoder, and SigLIP pretraining (arXiv 2303.15343) against a small text tower.

`ViT`: patch embedding (a k×k, stride-k convolution), learned position
embeddings, pre-LayerNorm blocks (multi-head self-attention, GELU MLP, biases
as in SigLIP), a final LayerNorm. `features(images)` returns the patch tokens
after block `feature_layer` (-1: the last, final-normed; -2: the block before
it, un-normed, …): Janus's understanding encoder reads these.

Family `siglip` trains the ViT with the sigmoid image–text loss: the image
tower pools the ViT's tokens with a multi-head attention probe (MAP head) and
projects; the text tower is the shared backbone (causal, RoPE) run over the
packed rows, pooled at each document's last token (its EOS) and projected. For
the n valid images of the global batch and their documents' texts,

    loss = -(1/n) Σ_i Σ_j log σ(z_ij · (exp(t')·⟨x_i, y_j⟩ + b)),   z_ij = +1 on pairs, -1 otherwise,

with x, y L2-normalised, t' = log 10 and b = -10 at init. Small datasets
repeat captions inside a batch (digits has ten), so with
`duplicate_captions_positive` an image and a text with the same caption count
as a pair too (captions compared by a hash of their tokens at their positions).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm.data import layout, packed
from unimm.models import axes, backbone, layers, settings

_named = nn.with_logical_partitioning


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  patch_size: int = 16
  width: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_dim: int = 4096
  feature_layer: int = -1  # block whose output is the feature grid (-1: the last, final-normed)
  dtype: str = "bfloat16"
  remat: bool = True  # recompute each block's activations in the backward pass
  checkpoint: str = ""  # a family-siglip run's checkpoints: Janus takes its ViT from there
  gelu_exact: bool = False  # the MLP's GELU: tanh approximation (SigLIP's gelu_pytorch_tanh) or exact (erf)

  @classmethod
  def from_config(cls, cfg) -> "ViTConfig":
    out = settings.from_config(cls, cfg, "config.model.vision")
    if not -out.depth <= out.feature_layer < out.depth or out.feature_layer == 0:
      raise ValueError(f"model.vision.feature_layer={out.feature_layer}: a block 1..{out.depth} or -1..-{out.depth}")
    return out

  @property
  def blocks_used(self) -> int:
    """Blocks that run to produce the features."""
    return self.feature_layer if self.feature_layer > 0 else self.depth + 1 + self.feature_layer

  def grid(self, image_shape) -> tuple[int, int]:
    h, w = image_shape[:2]
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(f"model.vision.patch_size={self.patch_size} does not divide {h}×{w} images")
    return h // self.patch_size, w // self.patch_size

  def num_patches(self, image_shape) -> int:
    gh, gw = self.grid(image_shape)
    return gh * gw


def _dense(features, in_name, out_name, dtype, name):
  return nn.Dense(features, dtype=dtype, name=name, kernel_init=_named(nn.initializers.xavier_uniform(),
                                                                       (in_name, out_name)),
                  bias_init=_named(nn.initializers.zeros, (out_name,)))


def _layer_norm(dtype, name):
  return nn.LayerNorm(1e-6, dtype=dtype, name=name, scale_init=_named(nn.initializers.ones, (axes.EMBED,)),
                      bias_init=_named(nn.initializers.zeros, (axes.EMBED,)))


class MultiHeadAttention(nn.Module):
  """Biased multi-head attention, no mask (queries may be a probe: MAP pooling)."""

  num_heads: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, queries, keys):
    d = queries.shape[-1]
    head = d // self.num_heads

    def project(x, name):
      y = layers.DenseGeneral((self.num_heads, head), (axes.EMBED,), (axes.HEADS, axes.HEAD_DIM), dtype=self.dtype,
                              name=name)(x)
      return y + self.param(f"{name}_bias", _named(nn.initializers.zeros, (axes.HEADS, axes.HEAD_DIM)),
                            (self.num_heads, head), jnp.float32).astype(self.dtype)
    q, k, v = project(queries, "q"), project(keys, "k"), project(keys, "v")
    scores = jnp.einsum("bqnh,bknh->bnqk", q, k).astype(jnp.float32) / math.sqrt(head)
    out = jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(scores, axis=-1).astype(self.dtype), v)
    out = layers.DenseGeneral((d,), (axes.HEADS, axes.HEAD_DIM), (axes.EMBED,), num_in_axes=2, dtype=self.dtype,
                              name="o")(out)
    bias = self.param("o_bias", _named(nn.initializers.zeros, (axes.EMBED,)), (d,), jnp.float32)
    return out + bias.astype(self.dtype)


class MLP(nn.Module):
  hidden: int
  dtype: jnp.dtype
  gelu_exact: bool = False

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    h = nn.gelu(_dense(self.hidden, axes.EMBED, axes.MLP, self.dtype, "fc1")(x), approximate=not self.gelu_exact)
    h = layers.constrain(h, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_MLP))
    return _dense(d, axes.MLP, axes.EMBED, self.dtype, "fc2")(h)


class EncoderBlock(nn.Module):
  cfg: ViTConfig

  @nn.compact
  def __call__(self, x):
    dt = jnp.dtype(self.cfg.dtype)
    y = _layer_norm(dt, "attn_norm")(x)
    x = x + MultiHeadAttention(self.cfg.num_heads, dt, name="attn")(y, y)
    x = x + MLP(self.cfg.mlp_dim, dt, self.cfg.gelu_exact, name="mlp")(_layer_norm(dt, "mlp_norm")(x))
    return layers.constrain(x, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))


def normalize_pixels(images):
  """uint8 [..., H, W, C] → float32 in [-1, 1]."""
  return images.astype(jnp.float32) / 127.5 - 1.0


class ViT(nn.Module):
  """uint8 images [N, H, W, C] → patch features [N, P, width] (raster order)."""

  cfg: ViTConfig

  @nn.compact
  def __call__(self, images):
    c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    p = c.patch_size
    c.grid(images.shape[1:])
    x = nn.Conv(c.width, (p, p), strides=(p, p), padding="VALID", dtype=dt, name="patch_embed",
                kernel_init=_named(nn.initializers.lecun_normal(), (None, None, axes.CONV_IN, axes.EMBED)),
                bias_init=_named(nn.initializers.zeros, (axes.EMBED,)))(normalize_pixels(images))
    x = x.reshape(x.shape[0], -1, c.width)
    pos = self.param("pos_embedding", _named(nn.initializers.normal(0.02), (None, axes.EMBED)), x.shape[1:],
                     jnp.float32)
    x = layers.constrain((x + pos).astype(dt), (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))
    block = nn.remat(EncoderBlock) if c.remat else EncoderBlock
    for i in range(c.blocks_used):
      x = block(c, name=f"block_{i}")(x)
    if c.blocks_used == c.depth:
      x = _layer_norm(dt, "final_norm")(x)
    return x


class MAPHead(nn.Module):
  """Multi-head attention pooling: a learned probe attends to the tokens, then a residual MLP."""

  num_heads: int
  mlp_dim: int
  dtype: jnp.dtype
  gelu_exact: bool = False

  @nn.compact
  def __call__(self, x):
    probe = self.param("probe", _named(nn.initializers.xavier_uniform(), (None, None, axes.EMBED)),
                       (1, 1, x.shape[-1]), jnp.float32)
    y = MultiHeadAttention(self.num_heads, self.dtype, name="attn")(
        jnp.broadcast_to(probe, (x.shape[0], 1, x.shape[-1])).astype(self.dtype), x)
    y = y + MLP(self.mlp_dim, self.dtype, self.gelu_exact, name="mlp")(_layer_norm(self.dtype, "norm")(y))
    return y[:, 0]


@dataclasses.dataclass(frozen=True)
class SigLIPLoss:
  embed_dim: int = 128  # the shared image–text embedding
  init_temperature: float = 10.0  # exp(t') at init
  init_bias: float = -10.0
  duplicate_captions_positive: bool = True

  @classmethod
  def from_config(cls, cfg) -> "SigLIPLoss":
    return settings.from_config(cls, cfg, "config.model.siglip")


def document_end(segment_ids, image_ids, max_images: int):
  """For each of a row's image slots k: (the segment of image k+1, the index of its document's last
  token) [B, M] each; segment 0 where the row has no image k+1."""
  t = segment_ids.shape[-1]
  k = jnp.arange(1, max_images + 1)
  in_image = image_ids[:, None, :] == k[None, :, None]  # [B, M, T]
  seg = jnp.max(jnp.where(in_image, segment_ids[:, None, :], 0), axis=-1)
  same = (segment_ids[:, None, :] == seg[..., None]) & (seg[..., None] > 0)
  end = jnp.max(jnp.where(same, jnp.arange(t), 0), axis=-1)
  return seg, end


def caption_hash(tokens, segment_ids, image_ids, seg):
  """int32 [B, M]: a hash of each image's document's text tokens at their positions (equal captions
  laid out the same way hash equal)."""
  t = tokens.shape[-1]
  pos = jnp.arange(t, dtype=jnp.uint32)
  start = jnp.argmax(segment_ids[:, None, :] == seg[..., None], axis=-1).astype(jnp.uint32)  # [B, M]
  u = (tokens.astype(jnp.uint32) + 1)[:, None, :] * jnp.uint32(2654435761) + \
      (pos[None, None, :] - start[..., None] + 1) * jnp.uint32(2246822519)
  u = (u ^ (u >> 15)) * jnp.uint32(3266489917)
  u = u ^ (u >> 13)
  text = (segment_ids[:, None, :] == seg[..., None]) & (image_ids[:, None, :] == 0)
  return jnp.sum(jnp.where(text, u, jnp.uint32(0)), axis=-1).astype(jnp.int32)


def sigmoid_loss_sum(img, txt, valid, logit_scale, bias, positive):
  """Σ_i Σ_j −log σ(z_ij (s⟨x_i, y_j⟩ + b)) over valid i, j. img/txt [n, E]; positive bool [n, n]."""
  x = img / jnp.linalg.norm(img, axis=-1, keepdims=True).clip(1e-6)
  y = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True).clip(1e-6)
  logits = logit_scale * x @ y.T + bias
  z = jnp.where(positive, 1.0, -1.0)
  pair_valid = valid[:, None] & valid[None, :]
  return -jnp.sum(jnp.where(pair_valid, jax.nn.log_sigmoid(z * logits), 0.0))


class SigLIPModel(nn.Module):
  """The image tower (ViT → MAP → projection) and the text tower (backbone over packed rows → the
  document's last token → projection)."""

  vit: ViTConfig
  text: backbone.BackboneConfig
  vocab_size: int
  loss: SigLIPLoss

  def setup(self):
    dt = jnp.dtype(self.vit.dtype)
    self.image_encoder = ViT(self.vit)
    self.map_head = MAPHead(self.vit.num_heads, self.vit.mlp_dim, dt, self.vit.gelu_exact)
    self.image_proj = _dense(self.loss.embed_dim, axes.EMBED, None, jnp.float32, None)
    self.text_embed = layers.Embed(self.vocab_size, self.text.dim, dtype=self.text.compute_dtype)
    self.text_encoder = backbone.Backbone(self.text)
    self.text_proj = _dense(self.loss.embed_dim, axes.EMBED, None, jnp.float32, None)
    self.t_prime = self.param("t_prime", nn.initializers.constant(math.log(self.loss.init_temperature)), (),
                              jnp.float32)
    self.bias = self.param("bias", nn.initializers.constant(self.loss.init_bias), (), jnp.float32)

  def embed_images(self, images):
    """uint8 [N, H, W, C] → [N, E]."""
    return self.image_proj(self.map_head(self.image_encoder(images)).astype(jnp.float32))

  def embed_texts(self, rows: packed.Rows, end):
    """Rows → the hidden state at `end` [B, M] (each image's document's last token) → [B, M, E]."""
    h = self.text_encoder(self.text_embed(rows.tokens), rows.positions, rows.segment_ids, rows.image_ids)
    pooled = jnp.take_along_axis(h, end[..., None], axis=1)
    return self.text_proj(pooled.astype(jnp.float32))

  def __call__(self, batch):
    """(image embeddings [B, M, E], text embeddings [B, M, E], logit scale, bias)."""
    b, m = batch["images"].shape[:2]
    img = self.embed_images(batch["images"].reshape(b * m, *batch["images"].shape[2:])).reshape(b, m, -1)
    _, end = document_end(batch["segment_ids"], batch["image_ids"], m)
    txt = self.embed_texts(packed.Rows.of(batch), end)
    return img, txt, jnp.exp(self.t_prime), self.bias


@dataclasses.dataclass
class SigLIPTask:
  """Family siglip: the sigmoid contrastive loss over the batch's images and their documents' texts."""

  model: SigLIPModel
  max_images: int

  def dummy_batch(self, batch_size: int, seq_len: int, image_shape) -> dict:
    return packed.example_batch(batch_size, seq_len, self.max_images, image_shape)

  def init(self, rng, batch: dict):
    return self.model.init(rng, batch)["params"]

  def positives(self, batch: dict):
    """bool [n, n] over the flattened [B·M] images: same image, or (optionally) the same caption."""
    n = batch["image_valid"].size
    if not self.model.loss.duplicate_captions_positive:
      return jnp.eye(n, dtype=bool)
    seg, _ = document_end(batch["segment_ids"], batch["image_ids"], batch["image_valid"].shape[1])
    h = caption_hash(batch["tokens"], batch["segment_ids"], batch["image_ids"], seg).reshape(-1)
    return (h[:, None] == h[None, :]) | jnp.eye(n, dtype=bool)

  def loss_terms(self, params, batch: dict, rng, step=0) -> dict:
    del rng, step
    img, txt, scale, bias = self.model.apply({"params": params}, batch)
    valid = batch["image_valid"].reshape(-1)
    e = img.shape[-1]
    total = sigmoid_loss_sum(img.reshape(-1, e), txt.reshape(-1, e), valid, scale, bias, self.positives(batch))
    return {"siglip": total}

  @staticmethod
  def loss_counts(batch: dict) -> dict:
    return {"siglip": jnp.sum(batch["image_valid"].astype(jnp.float32))}

  def combine(self, sums: dict, counts: dict):
    loss = sums["siglip"] / jnp.maximum(counts["siglip"], 1.0)
    return loss, {"siglip_loss": loss}

  # -- zero-shot use ---------------------------------------------------------------

  def image_embeddings(self, params, images):
    return self.model.apply({"params": params}, images, method=SigLIPModel.embed_images)

  def text_embeddings(self, params, rows: packed.Rows):
    """Rows of one document each (`caption_rows`) → [N, E]: each row's embedding at its last token."""
    end = jnp.sum(rows.segment_ids > 0, axis=-1, keepdims=True) - 1
    out = self.model.apply({"params": params}, rows, end, method=SigLIPModel.embed_texts)
    return out[:, 0]


def caption_rows(captions: list[str], tokenizer, image_slots: int, length: int) -> packed.Rows:
  """Each caption laid out as training lays out a caption-first pair (`BOS caption BOI slots EOI EOS`),
  one per row, right-padded to `length`: what the text tower embeds for zero-shot use."""
  s = tokenizer.specials
  documents = [layout.lay_out([tokenizer.encode(c), layout.IMAGE], s, image_slots, eos=True) for c in captions]
  for caption, (tokens, _) in zip(captions, documents):
    if len(tokens) > length:
      raise ValueError(f"caption {caption!r} lays out to {len(tokens)} tokens > {length}")
  return packed.Rows.padded(documents, length, s.pad)
