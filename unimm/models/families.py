"""Model families by name: config → the task object the trainer drives.

A task provides `init(rng, batch)`, `loss_terms(params, batch, rng, step)` (sums),
`loss_counts(batch)`, `combine(sums, counts)`, `dummy_batch(...)`; families that
generate have generators (`unimm.inference.generators`). Families: transfusion,
chameleon, janus (the unified models); kl_vae, vq, siglip (the image codecs and
encoder they are built on, trained through the same trainer).
"""

from __future__ import annotations

import dataclasses

from unimm import diffusion
from unimm.models import autoencoders, backbone, chameleon, janus, transfusion, vit, vq


def with_latent_stats(ae: autoencoders.AutoencoderConfig, frozen_codec):
  """(the autoencoder config with the latent shift/scale the diffusion uses, the VAE's params). A
  `FrozenVAE` (`loop.load_frozen_codec`, `random_frozen_codec`) carries them resolved; bare params keep
  the config's, which must then be pinned (scale > 0) before anything is encoded."""
  ae.pinned_latent_stats()  # checks the config's shift/scale
  if isinstance(frozen_codec, autoencoders.FrozenVAE):
    resolved = dataclasses.replace(ae, shift=float(frozen_codec.shift), scale=float(frozen_codec.scale))
    return resolved, frozen_codec.params
  return ae, frozen_codec


VOCAB_MULTIPLE = 128  # model vocabularies are padded to it (tiles of the embedding and the LM head)


def padded_vocabulary(ids: int) -> int:
  """`ids` rounded up to a multiple of VOCAB_MULTIPLE."""
  return -(-int(ids) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def text_vocabulary(config, tokenizer_ids: int | None) -> int:
  """The model's text vocabulary: `config.model.vocab_size` when the config declares one (paper configs
  do, so compiling needs no tokenizer), else the tokenizer's id count rounded up to a multiple of 128.

  `tokenizer_ids`: how many ids the tokenizer emits (its pieces plus the specials unimm appends; None:
  no tokenizer at hand). A declared vocabulary must hold them: an id past the model's rows would read a
  NaN embedding (Transfusion), an image code's (Chameleon) or a clipped target (Janus). Ids between the
  tokenizer's and the model's size are padding: no tokenizer emits them, so they are never targets, and
  the generators never sample them.
  """
  declared = int(config.model.vocab_size)
  if declared <= 0:
    if tokenizer_ids is None:
      raise ValueError("config.model.vocab_size=0 sizes the vocabulary from the tokenizer, and none was given; "
                       "declare the vocabulary (e.g. --config.model.vocab_size=32128) or load the tokenizer")
    return padded_vocabulary(tokenizer_ids)
  if tokenizer_ids is not None and int(tokenizer_ids) > declared:
    raise ValueError(
        f"config.model.vocab_size={declared} is smaller than the tokenizer's {int(tokenizer_ids)} ids "
        "(its pieces plus the specials unimm appends: PAD, BOI, EOI, IMG and 16 reserved ids, where the model "
        f"lacks them; tokenizer {config.data.tokenizer.path!r}). Set --config.model.vocab_size="
        f"{padded_vocabulary(tokenizer_ids)} (the next "
        "multiple of 128) or 0 (sized from the tokenizer).")
  return declared


def transfusion_task(config, vocab_size: int, frozen_codec=None) -> transfusion.TransfusionTask:
  m, d = config.model, config.data
  ae = autoencoders.AutoencoderConfig.from_config(m.autoencoder)
  if ae.kind != "identity":
    ae, frozen_codec = with_latent_stats(ae, frozen_codec)
  image_shape = (int(d.image_size), int(d.image_size), int(d.image_channels))
  if ae.kind != "identity" and frozen_codec is None and not ae.checkpoint:
    raise ValueError("config.model.autoencoder.kind='kl_vae' needs config.model.autoencoder.checkpoint "
                     "(train one with configs/vae/...) or frozen params passed in.")
  model = transfusion.TransfusionModel(
      vocab_size=text_vocabulary(config, vocab_size),
      backbone=backbone.BackboneConfig.from_config(m.backbone),
      latent_shape=ae.latent_shape(image_shape),
      max_images=int(d.max_images_per_row),
      patch_kind=m.patch_kind, patch_size=int(m.patch_size),
      unet_channels=tuple(m.unet_channels), unet_blocks=int(m.unet_blocks))
  return transfusion.TransfusionTask(
      model=model, autoencoder=ae, schedule=diffusion.Schedule.cosine(int(m.num_timesteps)),
      diffusion_weight=float(m.diffusion_weight), prediction=str(m.prediction), z_loss=float(m.z_loss),
      frozen_autoencoder=frozen_codec, image_shape=image_shape, lm_loss_chunk=int(m.lm_loss_chunk),
      tokenizer_ids=vocab_size or 0,
      clip_x0=float(m.clip_x0))


def autoencoder_task(config, vocab_size: int, frozen_codec=None) -> autoencoders.AutoencoderTask:
  """Trains config.model.autoencoder (kind kl_vae) itself."""
  del vocab_size, frozen_codec
  ae = autoencoders.AutoencoderConfig.from_config(config.model.autoencoder)
  if ae.kind != "kl_vae":
    raise ValueError(f"family kl_vae trains config.model.autoencoder.kind='kl_vae', got {ae.kind!r}")
  ae.latent_shape((int(config.data.image_size),) * 2 + (int(config.data.image_channels),))  # checks downsample
  return autoencoders.AutoencoderTask(autoencoders.KLVAE(ae, int(config.data.image_channels)),
                                      kl_weight=float(config.model.kl_weight), l1=bool(config.model.l1))


def chameleon_task(config, vocab_size: int, frozen_codec=None) -> chameleon.ChameleonTask:
  """Chameleon: the frozen VQ tokenizer of config.model.vq (its `checkpoint`) puts images in the vocabulary."""
  m, d = config.model, config.data
  cfg = vq.VQConfig.from_config(m.vq)
  if frozen_codec is None:
    raise ValueError("family chameleon needs a trained VQ tokenizer: set config.model.vq.checkpoint to a "
                     "configs/tokenizers/... run's checkpoints dir (or pass its params).")
  image_shape = (int(d.image_size), int(d.image_size), int(d.image_channels))
  text_vocab = text_vocabulary(config, vocab_size)
  model = chameleon.ChameleonModel(
      vocab_size=text_vocab + cfg.codebook_size, backbone=backbone.BackboneConfig.from_config(m.backbone),
      max_images=int(d.max_images_per_row), slots=int(d.image_slots))
  return chameleon.ChameleonTask(model=model, tokenizer=vq.VQModel(cfg, image_shape[-1]), frozen_tokenizer=frozen_codec,
                                 text_vocab=text_vocab, image_shape=image_shape, z_loss=float(m.z_loss),
                                 tokenizer_ids=vocab_size or 0)


def tokenizer_task(config, vocab_size: int, frozen_codec=None) -> vq.TokenizerTask:
  """Trains the VQ image tokenizer config.model.vq itself (configs/tokenizers/)."""
  del vocab_size, frozen_codec
  cfg = vq.VQConfig.from_config(config.model.vq)
  cfg.grid((int(config.data.image_size),) * 2)  # checks the downsampling divides the images
  return vq.TokenizerTask(vq.VQModel(cfg, int(config.data.image_channels)),
                          vq.TokenizerLoss.from_config(config.model.vq_loss))


def janus_task(config, vocab_size: int, frozen_codec=None) -> janus.JanusTask:
  """Janus: ViT (model.vision) for images read, the frozen VQ tokenizer (model.vq.checkpoint) for images written."""
  if frozen_codec is None:
    raise ValueError("family janus needs a trained VQ tokenizer: set config.model.vq.checkpoint to a "
                     "configs/tokenizers/... run's checkpoints dir (or pass its params).")
  d = config.data
  image_shape = (int(d.image_size), int(d.image_size), int(d.image_channels))
  return janus.build(config, text_vocabulary(config, vocab_size), frozen_codec, image_shape, tokenizer_ids=vocab_size)


def siglip_task(config, vocab_size: int, frozen_codec=None) -> vit.SigLIPTask:
  """Pretrains the ViT of config.model.vision with the sigmoid image–text loss (for Janus to read with)."""
  del frozen_codec
  m = config.model
  cfg = vit.ViTConfig.from_config(m.vision)
  cfg.grid((int(config.data.image_size),) * 2)  # checks the patch size divides the images
  model = vit.SigLIPModel(vit=cfg, text=backbone.BackboneConfig.from_config(m.siglip_text),
                          vocab_size=text_vocabulary(config, vocab_size), loss=vit.SigLIPLoss.from_config(m.siglip))
  return vit.SigLIPTask(model=model, max_images=int(config.data.max_images_per_row))


FAMILIES = {"transfusion": transfusion_task, "chameleon": chameleon_task, "janus": janus_task,
            "kl_vae": autoencoder_task, "vq": tokenizer_task, "siglip": siglip_task}
CODE_FAMILIES = ("chameleon", "janus")  # families that write images as VQ codes


def pretrained_parts(config) -> list[tuple[str, str, object]]:
  """Parts of a fresh model that start from another run: (param path prefix, that run's checkpoints dir,
  a function from its params to the part's). Janus: the SigLIP run's ViT (model.vision.checkpoint)."""
  if config.model.family == "janus" and config.model.vision.checkpoint:
    return [("vision_encoder", config.model.vision.checkpoint, janus.vision_params)]
  return []


def random_frozen_codec(config, seed: int = 0):
  """Randomly initialised params of the frozen image codec `config`'s family reads images with (None if
  it needs none): for benchmarks, compile-only runs and tests, where shapes and cost are what matter."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  d = config.data
  image = jnp.zeros((1, int(d.image_size), int(d.image_size), int(d.image_channels)), jnp.uint8)
  if config.model.family in CODE_FAMILIES:
    model = vq.VQModel(vq.VQConfig.from_config(config.model.vq), image.shape[-1])
    return nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), image)["params"])
  ae = autoencoders.AutoencoderConfig.from_config(config.model.autoencoder)
  if config.model.family == "transfusion" and ae.kind == "kl_vae":
    vae = autoencoders.KLVAE(ae, image.shape[-1])
    params = nn.meta.unbox(jax.jit(vae.init)(jax.random.key(seed), image, jax.random.key(1))["params"])
    return autoencoders.FrozenVAE(params, shift=0.0, scale=1.0)  # random weights: no statistics to read
  return None


def build_task(config, vocab_size: int | None, **kwargs):
  """`config`'s task; `vocab_size`: the ids the tokenizer emits (None: none at hand, the config declares
  the vocabulary — see `text_vocabulary`)."""
  family = config.model.family
  if config.model.backbone.remat == "auto":  # built outside a training setup (eval, sample, tools): this host's
    from unimm.parallel import targets  # pylint: disable=g-import-not-at-top
    config = targets.resolve_targets(config, targets.platform_of())
  if family not in FAMILIES:
    raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
  return FAMILIES[family](config, vocab_size, **kwargs)
