"""Image autoencoders: pixels ↔ latents for continuous-image families.

* ``identity``: the latent is the image itself, scaled to [-1, 1] (the tiny demo).
* ``kl_vae``: a convolutional KL-VAE (Rombach et al.): residual conv encoder with
  ×2 downsampling per level to a Gaussian posterior over `latent_channels`
  (8, like Transfusion's), and a mirrored decoder. `AutoencoderTask` trains it
  through the common trainer on the images of packed rows with its own config
  (configs/vae/): reconstruction (L2 or L1) + a small KL; LDM's perceptual and
  adversarial terms are not implemented. It is then used frozen: the family's
  config names its checkpoint.

A KL-VAE's latents are unbounded and of whatever spread training left them, so
the diffusion sees z' = (z − shift)·scale (diffusers' `shift_factor` and
`scaling_factor`): by default shift 0 and scale 1/std of the posterior samples of
the first `stats_images` training images, measured once per VAE run and stored
beside its checkpoints (`unimm.train.latent_stats`; `stats_center` also takes
shift = their mean). A consumer gets them with the params (`FrozenVAE`) unless its
config pins `scale` > 0 (and `shift`), e.g. 0.18215 for an imported SD VAE.
`scale` 0 in a config means "from the VAE run"; encoding with it unresolved is an
error. The identity autoencoder has no statistics: pixels are already in [-1, 1].

`encode(images uint8 [..., H, W, C], rng) → latents`, `decode(latents) → float
pixels in [-1, 1]`; `to_uint8` turns those into images.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm.models import axes, layers
from unimm.models.patches import ResBlock


def to_unit(images):
  """uint8 pixels → float32 in [-1, 1]."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x):
  """[-1, 1] floats → uint8 pixels."""
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


LAYOUTS = ("unimm", "diffusers")


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  kind: str = "identity"  # identity | kl_vae
  downsample: int = 1  # spatial factor image → latent (kl_vae: 2 ** (len(channel_mults) - 1))
  latent_channels: int = 0  # kl_vae; identity keeps the image's channels
  channels: int = 64
  channel_mults: tuple[int, ...] = (1, 2, 2)
  blocks_per_level: int = 1
  # kl_vae latents as the diffusion sees them: (z − shift)·scale. Configs default to scale 0 = from the
  # VAE run's latent_stats.json (resolved when the frozen VAE is loaded); scale > 0 pins both. Built
  # directly, the module's default is the raw latents.
  shift: float = 0.0
  scale: float = 1.0
  checkpoint: str = ""  # kl_vae weights (an orbax checkpoint dir) when used frozen
  stats_images: int = 1024  # training images the latent statistics are measured on
  stats_center: bool = False  # True: shift = the latents' mean (else 0); scale = 1/std about the mean either way
  # diffusers' AutoencoderKL (SD, SDXL, FLUX VAEs; unimm.convert): 1×1 quant_conv / post_quant_conv around
  # the latent, one more ResBlock per decoder level than the encoder has, nearest-neighbour ×2 then a conv to
  # upsample (instead of a transposed conv), attention in the middle blocks, GroupNorm over 32 groups.
  layout: str = "unimm"  # unimm | diffusers
  norm_groups: int = 8
  mid_attention: bool = False
  quant_conv: bool = True  # diffusers' use_quant_conv / use_post_quant_conv (FLUX's VAE has none)

  @classmethod
  def from_config(cls, cfg) -> "AutoencoderConfig":
    kw = {k: cfg[k] for k in cfg.keys()}
    if "channel_mults" in kw:
      kw["channel_mults"] = tuple(kw["channel_mults"])
    return cls(**kw)

  def __post_init__(self):
    if self.layout not in LAYOUTS:
      raise ValueError(f"model.autoencoder.layout={self.layout!r}; expected one of {LAYOUTS}")

  def pinned_latent_stats(self) -> tuple[float, float] | None:
    """(shift, scale) when the config pins them (scale > 0); None: they come from the VAE run."""
    if self.scale > 0:
      return float(self.shift), float(self.scale)
    if self.scale < 0:
      raise ValueError(f"model.autoencoder.scale={self.scale}; expected 0 (from the VAE run's latent "
                       "statistics) or > 0 (pinned, e.g. 0.18215 for an SD VAE)")
    if self.shift:
      raise ValueError(f"model.autoencoder.shift={self.shift} is only used with a pinned scale: set "
                       "model.autoencoder.scale > 0 too, or shift=0 to take both from the VAE run")
    return None

  def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    h, w, c = image_shape
    if self.kind == "identity":
      return h, w, c
    if self.downsample != 2 ** (len(self.channel_mults) - 1):
      raise ValueError(f"kl_vae with channel_mults {self.channel_mults} downsamples by "
                       f"{2 ** (len(self.channel_mults) - 1)}, but downsample={self.downsample}")
    return h // self.downsample, w // self.downsample, self.latent_channels


@flax.struct.dataclass
class FrozenVAE:
  """A trained KL-VAE's params with the latent shift/scale its consumers use (resolved once, by
  `unimm.train.latent_stats.resolve`, so training, eval and sampling read the same values). A pytree
  whose leaves are the params (shift and scale are static), so shape-only tracing can take it."""

  params: Any
  shift: float = flax.struct.field(pytree_node=False, default=0.0)
  scale: float = flax.struct.field(pytree_node=False, default=1.0)


class SpatialAttention(nn.Module):
  """Single-head self-attention over an image's positions (GroupNorm, 1×1 q/k/v, residual)."""

  groups: int = 8

  @nn.compact
  def __call__(self, x):
    n, h, w, c = x.shape
    y = layers.group_norm(c, self.groups, name="norm")(x).reshape(n, h * w, c)
    q, k, v = (layers.dense(c, axes.CONV_IN, axes.CONV_OUT, name=name)(y) for name in ("q", "k", "v"))
    weights = jax.nn.softmax(jnp.einsum("nqc,nkc->nqk", q, k) / jnp.sqrt(c).astype(q.dtype), axis=-1)
    out = layers.dense(c, axes.CONV_IN, axes.CONV_OUT, name="proj")(jnp.einsum("nqk,nkc->nqc", weights, v))
    return x + out.reshape(n, h, w, c)


def _middle(x, channels: int, attention: bool, groups: int = 8):
  """The lowest-resolution block: ResBlock, or ResBlock → attention → ResBlock (LDM, LlamaGen)."""
  x = ResBlock(channels, groups, name="mid")(x)
  if attention:
    x = SpatialAttention(groups, name="mid_attn")(x)
    x = ResBlock(channels, groups, name="mid2")(x)
  return x


class ConvEncoder(nn.Module):
  """Pixels in [-1, 1] → `out_channels` features, ×2 downsampling per level after the first."""

  channels: int
  channel_mults: Sequence[int]
  blocks_per_level: int
  out_channels: int
  attention: bool = False  # self-attention at the lowest resolution
  groups: int = 8
  attention_levels: tuple[int, ...] = ()  # levels with self-attention after each of their blocks (Chameleon's VQ)

  @nn.compact
  def __call__(self, x):
    x = layers.conv(self.channels, name="stem")(x)
    for i, mult in enumerate(self.channel_mults):
      for j in range(self.blocks_per_level):
        x = ResBlock(self.channels * mult, self.groups, name=f"down{i}_{j}")(x)
        if i in self.attention_levels:
          x = SpatialAttention(self.groups, name=f"down{i}_{j}_attn")(x)
      if i < len(self.channel_mults) - 1:
        # SAME on an even side pads 0 before and 1 after: diffusers' asymmetric (0, 1, 0, 1) padding.
        x = layers.conv(self.channels * mult, strides=(2, 2), name=f"downsample{i}")(x)
    x = _middle(x, self.channels * self.channel_mults[-1], self.attention, self.groups)
    x = nn.silu(layers.group_norm(x.shape[-1], self.groups, name="out_norm")(x))
    return layers.conv(self.out_channels, name="out")(x)


class ConvDecoder(nn.Module):
  """The mirror of `ConvEncoder`: features → pixels in [-1, 1] (unclipped)."""

  channels: int
  channel_mults: Sequence[int]
  blocks_per_level: int
  out_channels: int
  attention: bool = False
  groups: int = 8
  # diffusers (and taming's VQGAN): blocks_per_level + 1 ResBlocks a level, ×2 upsampling by nearest
  # neighbour then a 3×3 conv that keeps the width (the next level's first ResBlock changes it).
  diffusers: bool = False
  attention_levels: tuple[int, ...] = ()  # levels with self-attention after each of their blocks (VQGANs)

  @nn.compact
  def __call__(self, z):
    x = layers.conv(self.channels * self.channel_mults[-1], name="stem")(z)
    x = _middle(x, self.channels * self.channel_mults[-1], self.attention, self.groups)
    for i in reversed(range(len(self.channel_mults))):
      for j in range(self.blocks_per_level + int(self.diffusers)):
        x = ResBlock(self.channels * self.channel_mults[i], self.groups, name=f"up{i}_{j}")(x)
        if i in self.attention_levels:
          x = SpatialAttention(self.groups, name=f"up{i}_{j}_attn")(x)
      if i > 0 and self.diffusers:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        x = layers.conv(x.shape[-1], name=f"upsample{i}")(x)
      elif i > 0:
        x = layers.conv(self.channels * self.channel_mults[i - 1], (2, 2), strides=(2, 2), transpose=True,
                        name=f"upsample{i}")(x)
    x = nn.silu(layers.group_norm(x.shape[-1], self.groups, name="out_norm")(x))
    return layers.conv(self.out_channels, name="out")(x)


class KLVAE(nn.Module):
  cfg: AutoencoderConfig
  image_channels: int

  def setup(self):
    c = self.cfg
    diffusers = c.layout == "diffusers"
    self.encoder = ConvEncoder(c.channels, c.channel_mults, c.blocks_per_level, 2 * c.latent_channels,
                               c.mid_attention, c.norm_groups)
    self.decoder = ConvDecoder(c.channels, c.channel_mults, c.blocks_per_level, self.image_channels,
                               c.mid_attention, c.norm_groups, diffusers)
    if diffusers and c.quant_conv:
      self.quant_conv = layers.conv(2 * c.latent_channels, (1, 1), name="quant_conv")
      self.post_quant_conv = layers.conv(c.latent_channels, (1, 1), name="post_quant_conv")

  def _quant_convs(self) -> bool:
    return self.cfg.layout == "diffusers" and self.cfg.quant_conv

  def _decode_raw(self, z):
    return self.decoder(self.post_quant_conv(z) if self._quant_convs() else z)

  def posterior(self, images):
    """Mean and log-variance of q(z | x) for uint8 images [N, H, W, C]."""
    moments = self.encoder(to_unit(images))
    if self._quant_convs():
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def _latent_scale(self) -> float:
    if not self.cfg.scale > 0:
      raise ValueError(
          f"KL-VAE latent scale {self.cfg.scale} is unresolved: load the frozen VAE with "
          "unimm.families.load_frozen_codec (it reads or measures the VAE run's latent statistics) or pass "
          "FrozenVAE(params, shift, scale), or pin --config.model.autoencoder.scale=S > 0.")
    return self.cfg.scale

  def encode(self, images, rng=None):
    """(z − shift)·scale for a posterior sample z (its mean when rng is None)."""
    scale = self._latent_scale()
    mean, logvar = self.posterior(images)
    z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    return (z - self.cfg.shift) * scale

  def decode(self, latents):
    """Pixels in [-1, 1] (unclipped) for latents as `encode` returns them."""
    return self._decode_raw(latents / self._latent_scale() + self.cfg.shift)

  def __call__(self, images, rng):
    """Reconstruction in [-1, 1], mean, logvar (for training)."""
    mean, logvar = self.posterior(images)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    return self._decode_raw(z), mean, logvar


@dataclasses.dataclass
class AutoencoderTask:
  """Training a KL-VAE through the common trainer, on the images of packed rows."""

  vae: KLVAE
  kl_weight: float = 1e-6
  l1: bool = False

  def dummy_batch(self, batch_size: int, seq_len: int, image_shape) -> dict:
    del seq_len
    return {"images": jnp.zeros((batch_size, 1, *image_shape), jnp.uint8),
            "image_valid": jnp.ones((batch_size, 1), bool)}

  def init(self, rng, batch: dict):
    images = batch["images"]
    flat = images.reshape(-1, *images.shape[2:])
    return self.vae.init(rng, flat, jax.random.key(0))["params"]

  def loss_terms(self, params, batch: dict, rng, step=0) -> dict:
    del step
    images = batch["images"]
    flat = images.reshape(-1, *images.shape[2:])
    valid = batch["image_valid"].reshape(-1).astype(jnp.float32)
    recon, mean, logvar = self.vae.apply({"params": params}, flat, rng)
    target = to_unit(flat)
    err = jnp.abs(recon - target) if self.l1 else jnp.square(recon - target)
    rec = jnp.mean(err, axis=(1, 2, 3))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    return {"reconstruction": jnp.sum(rec * valid), "kl": jnp.sum(kl * valid)}

  @staticmethod
  def loss_counts(batch: dict) -> dict:
    return {"images": jnp.sum(batch["image_valid"])}

  def combine(self, sums: dict, counts: dict):
    n = jnp.maximum(counts["images"], 1.0)
    rec, kl = sums["reconstruction"] / n, sums["kl"] / n
    return rec + self.kl_weight * kl, {"reconstruction_loss": rec, "kl_loss": kl}
