"""The VQ image tokenizer (LlamaGen's, which Chameleon- and Janus-style families use) and its training.

`VQModel`: the conv encoder (GroupNorm residual blocks, channel multipliers,
×2 downsampling per level, attention at the lowest resolution) → a 1×1
projection to the low-dimensional code space (8) → `VectorQuantizer` (cosine
lookup, straight-through) → a 1×1 projection back → the mirrored decoder.
`encode` gives code ids [N, h, w] in raster order, `decode_codes` pixels.

`TokenizerTask` trains it through the common trainer (family ``vq``) on the
images of packed rows: reconstruction (L2 or L1) + codebook + β·commitment
(+ optional entropy), and behind config switches an LPIPS-style perceptual
term (`unimm.models.perceptual`, weights from a local file) and a PatchGAN
discriminator with the hinge loss. The discriminator's parameters live beside
the tokenizer's in one tree (``{"vq": …, "discriminator": …}``) and one
optimiser updates both: the generator's adversarial term sees the
discriminator through `stop_gradient`, the discriminator's term sees stopped
reconstructions, so each part gets only its own loss's gradient. Dead codes
(unused in a batch) are re-initialised from the batch's encoder outputs every
`reinit_dead_codes_every` steps. Families that read or write codes load the
``vq`` subtree frozen (config.model.vq.checkpoint).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm.models import autoencoders, axes, layers, perceptual, quantizer, settings


@dataclasses.dataclass(frozen=True)
class VQConfig:
  channels: int = 128
  channel_mults: tuple[int, ...] = (1, 1, 2, 2, 4)  # LlamaGen: 4 downsamplings = /16
  blocks_per_level: int = 2
  attention: bool = True  # self-attention at the lowest resolution
  z_channels: int = 256  # encoder output width before the projection to the code space
  codebook_size: int = 16384
  code_dim: int = 8
  l2_normalized: bool = True
  beta: float = 0.25
  entropy_temperature: float = 0.01
  checkpoint: str = ""  # a trained tokenizer's checkpoint dir, for families that use it frozen
  # Converted VQGANs (unimm.convert: Chameleon's, Janus's): GroupNorm over 32 groups, attention after the
  # blocks of these levels (encoder and decoder), layout "taming" (the decoder has one more block a level
  # and upsamples by nearest neighbour + conv); Chameleon's codebook is Euclidean (l2_normalized=False).
  norm_groups: int = 8
  attention_levels: tuple[int, ...] = ()
  layout: str = "unimm"  # unimm | taming

  def __post_init__(self):
    if self.layout not in ("unimm", "taming"):
      raise ValueError(f"model.vq.layout={self.layout!r}; expected 'unimm' or 'taming'")

  @classmethod
  def from_config(cls, cfg) -> "VQConfig":
    return settings.from_config(cls, cfg, "config.model.vq")

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.channel_mults) - 1)

  def grid(self, image_shape) -> tuple[int, int]:
    """Code grid (h, w) of an image [H, W, C]."""
    h, w = image_shape[0], image_shape[1]
    if h % self.downsample or w % self.downsample:
      raise ValueError(f"images of {h}x{w} do not divide by the tokenizer's downsampling {self.downsample} "
                       f"(channel_mults {self.channel_mults})")
    return h // self.downsample, w // self.downsample

  def num_codes(self, image_shape) -> int:
    gh, gw = self.grid(image_shape)
    return gh * gw


class VQModel(nn.Module):
  cfg: VQConfig
  image_channels: int

  def setup(self):
    c = self.cfg
    self.encoder = autoencoders.ConvEncoder(c.channels, c.channel_mults, c.blocks_per_level, c.z_channels,
                                            attention=c.attention, groups=c.norm_groups,
                                            attention_levels=tuple(c.attention_levels))
    self.quant_proj = layers.dense(c.code_dim, axes.CONV_IN, axes.CODE_DIM)
    self.quantizer = quantizer.VectorQuantizer(c.codebook_size, c.code_dim, l2_normalized=c.l2_normalized,
                                               beta=c.beta, entropy_temperature=c.entropy_temperature)
    self.post_quant_proj = layers.dense(c.z_channels, axes.CODE_DIM, axes.CONV_OUT)
    self.decoder = autoencoders.ConvDecoder(c.channels, c.channel_mults, c.blocks_per_level, self.image_channels,
                                            attention=c.attention, groups=c.norm_groups,
                                            diffusers=c.layout == "taming",
                                            attention_levels=tuple(c.attention_levels))

  def features(self, images):
    """uint8 images [N, H, W, C] → pre-quantisation features [N, h, w, code_dim]."""
    return self.quant_proj(self.encoder(autoencoders.to_unit(images)))

  def quantize(self, images, weights=None):
    """(z_q, aux) for uint8 images; `weights` [N] weight each image's positions (0: padding)."""
    return self.quantize_features(self.features(images), weights)

  def quantize_features(self, z, weights=None):
    return self.quantizer(z, None if weights is None else weights[:, None, None])

  def encode(self, images):
    """uint8 images [N, H, W, C] → code ids [N, h, w] (raster order when flattened)."""
    return self.quantize(images)[1]["indices"]

  def decode_vectors(self, z_q):
    return self.decoder(self.post_quant_proj(z_q))

  def decode_codes(self, indices):
    """Code ids [N, h, w] → pixels in [-1, 1] [N, H, W, C]."""
    return self.decode_vectors(self.quantizer.lookup(indices))

  def __call__(self, images, weights=None):
    """Reconstruction in [-1, 1] and the quantiser's aux (losses, indices, usage)."""
    z_q, aux = self.quantize(images, weights)
    return self.decode_vectors(z_q), aux


class PatchDiscriminator(nn.Module):
  """PatchGAN (pix2pix): strided 4×4 convs with GroupNorm and leaky ReLU → a map of real/fake logits."""

  channels: int = 64
  num_layers: int = 3

  @nn.compact
  def __call__(self, x):
    x = nn.leaky_relu(layers.conv(self.channels, (4, 4), strides=(2, 2), name="stem")(x), 0.2)
    for i in range(1, self.num_layers):
      width = self.channels * min(2 ** i, 8)
      x = layers.conv(width, (4, 4), strides=(2, 2), name=f"conv{i}")(x)
      x = nn.leaky_relu(layers.group_norm(width, 32, name=f"norm{i}")(x), 0.2)
    return layers.conv(1, (4, 4), name="logits")(x)[..., 0]


@dataclasses.dataclass(frozen=True)
class TokenizerLoss:
  l1: bool = False  # reconstruction: L1 instead of L2
  codebook_weight: float = 1.0  # on codebook + β·commitment
  entropy_weight: float = 0.0
  perceptual_weight: float = 0.0  # > 0 needs perceptual_weights
  perceptual_weights: str = ""  # a .npz of VGG16 + LPIPS linear weights (unimm/models/perceptual.py)
  gan_weight: float = 0.0  # > 0: PatchGAN discriminator with the hinge loss
  gan_start: int = 0  # the adversarial terms switch on at this step
  disc_channels: int = 64
  disc_layers: int = 3
  reinit_dead_codes_every: int = 0  # every N steps, codes unused in the batch restart from encoder outputs
  reinit_dead_codes_until: int = 0  # …up to this step (0: all run), leaving the decoder time to learn the last ones

  @classmethod
  def from_config(cls, cfg) -> "TokenizerLoss":
    return settings.from_config(cls, cfg, "config.model.vq_loss")


@dataclasses.dataclass
class TokenizerTask:
  """Trains `VQModel` through the common trainer on the images of packed rows."""

  vq: VQModel
  loss: TokenizerLoss

  def __post_init__(self):
    self.discriminator = PatchDiscriminator(self.loss.disc_channels, self.loss.disc_layers)
    self._perceptual = None
    if self.loss.perceptual_weight > 0:
      if not self.loss.perceptual_weights:
        raise ValueError("config.model.vq_loss.perceptual_weight > 0 needs vq_loss.perceptual_weights, a local "
                         ".npz of VGG16 + LPIPS weights (see unimm/models/perceptual.py); nothing is downloaded.")
      self._perceptual = perceptual.load(self.loss.perceptual_weights)

  def dummy_batch(self, batch_size: int, seq_len: int, image_shape) -> dict:
    del seq_len
    return {"images": jnp.zeros((batch_size, 1, *image_shape), jnp.uint8),
            "image_valid": jnp.ones((batch_size, 1), bool)}

  @staticmethod
  def _flat(batch):
    images = batch["images"]
    return images.reshape(-1, *images.shape[2:]), batch["image_valid"].reshape(-1).astype(jnp.float32)

  def init(self, rng, batch: dict):
    images, _ = self._flat(batch)
    params = {"vq": self.vq.init(rng, images)["params"]}
    if self.loss.gan_weight > 0:
      params["discriminator"] = self.discriminator.init(jax.random.fold_in(rng, 1),
                                                        autoencoders.to_unit(images))["params"]
    return params

  def loss_terms(self, params, batch: dict, rng, step=0) -> dict:
    del rng
    l = self.loss
    images, valid = self._flat(batch)
    n = jnp.sum(valid)
    recon, aux = self.vq.apply({"params": params["vq"]}, images, valid)
    target = autoencoders.to_unit(images)
    err = jnp.abs(recon - target) if l.l1 else jnp.square(recon - target)
    sums = {"reconstruction": jnp.sum(jnp.mean(err, axis=(1, 2, 3)) * valid),
            # The quantiser's terms are means over this (micro)batch's valid positions: ×n gives sums.
            "codebook": (aux["codebook_loss"] + aux["commitment_loss"]) * n,
            "entropy": aux["entropy_loss"] * n,
            "code_counts": aux["code_counts"]}
    if self._perceptual is not None:
      sums["perceptual"] = jnp.sum(perceptual.lpips(self._perceptual, recon, target) * valid)
    if l.gan_weight > 0:
      on = (jnp.asarray(step) >= l.gan_start).astype(jnp.float32)
      frozen_disc = jax.lax.stop_gradient(params["discriminator"])
      fake_for_gen = self.discriminator.apply({"params": frozen_disc}, recon)
      sums["generator_adversarial"] = on * jnp.sum(-jnp.mean(fake_for_gen, axis=(1, 2)) * valid)
      real = self.discriminator.apply({"params": params["discriminator"]}, target)
      fake = self.discriminator.apply({"params": params["discriminator"]}, jax.lax.stop_gradient(recon))
      hinge = jnp.mean(nn.relu(1.0 - real), axis=(1, 2)) + jnp.mean(nn.relu(1.0 + fake), axis=(1, 2))
      sums["discriminator"] = on * jnp.sum(0.5 * hinge * valid)
    return sums

  @staticmethod
  def loss_counts(batch: dict) -> dict:
    return {"images": jnp.sum(batch["image_valid"])}

  def combine(self, sums: dict, counts: dict):
    l = self.loss
    n = jnp.maximum(counts["images"], 1.0)
    parts = {"reconstruction_loss": sums["reconstruction"] / n, "codebook_loss": sums["codebook"] / n,
             "entropy_loss": sums["entropy"] / n}
    total = parts["reconstruction_loss"] + l.codebook_weight * parts["codebook_loss"]
    total += l.entropy_weight * parts["entropy_loss"]
    if "perceptual" in sums:
      parts["perceptual_loss"] = sums["perceptual"] / n
      total += l.perceptual_weight * parts["perceptual_loss"]
    if "discriminator" in sums:
      parts["generator_adversarial_loss"] = sums["generator_adversarial"] / n
      parts["discriminator_loss"] = sums["discriminator"] / n
      total += l.gan_weight * (parts["generator_adversarial_loss"] + parts["discriminator_loss"])
    parts.update(quantizer.usage_from_counts(sums["code_counts"]))
    return total, parts

  def after_update(self, params, batch: dict, rng, step):
    """Every `reinit_dead_codes_every` steps (up to `reinit_dead_codes_until`): codes no valid position
    chose restart at encoder outputs. Without restarts the tiny shapes tokenizer uses 15% of its codes
    after 300 steps (perplexity 2.7); with them, 97%."""
    every = self.loss.reinit_dead_codes_every
    if not every:
      return params

    def reinit(params):
      images, valid = self._flat(batch)
      feats = self.vq.apply({"params": params["vq"]}, images, method=VQModel.features)
      _, aux = self.vq.apply({"params": params["vq"]}, feats, valid, method=VQModel.quantize_features)
      flat = feats.reshape(-1, feats.shape[-1])
      weights = jnp.broadcast_to(valid[:, None, None], feats.shape[:-1]).reshape(-1)
      codebook = params["vq"]["quantizer"]["codebook"]
      picks = jax.random.choice(rng, flat.shape[0], (codebook.shape[0],), p=weights / jnp.maximum(
          jnp.sum(weights), 1e-9))
      dead = aux["code_counts"] == 0
      new = jnp.where(dead[:, None], flat[picks].astype(codebook.dtype), codebook)
      vq_params = {**params["vq"], "quantizer": {**params["vq"]["quantizer"], "codebook": new}}
      return {**params, "vq": vq_params}

    due = (step + 1) % every == 0
    if self.loss.reinit_dead_codes_until:
      due &= step + 1 <= self.loss.reinit_dead_codes_until
    return jax.lax.cond(due, reinit, lambda p: p, params)
