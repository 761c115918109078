"""Model families: one record per family, registered by name, owning everything family-specific.

A family is a `Family` record (`register`ed here for the built-in ones, or by a user or a test at run
time): how to build its task (the object the trainer drives, see `Task`), which frozen image codec it
reads images with and how to load it, which parts start from another run, which parameters its FLOP count
leaves out, its evaluator, its image and text generators, and what a finished run writes for its
consumers. `train/`, `eval/`, `inference/` and `main.py` ask the record (`of(config)`); none of them
decides by a family's name or a task's type. Families: transfusion, chameleon, janus (the unified models);
kl_vae, vq, siglip (the image codecs and encoder they are built on, trained through the same trainer).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, runtime_checkable

import ml_collections as mlc

from unimm import diffusion, flow
from unimm.data import layout
from unimm.inference import codes, images, text
from unimm.models import autoencoders, backbone, chameleon, code_images, janus, transfusion, vit, vq


@runtime_checkable
class Task(Protocol):
  """What the trainer drives (`unimm.train.step`). Losses are sums over a batch's targets
  (`loss_terms`) with their counts (`loss_counts`), so microbatches and data-parallel shards add up before
  `combine` divides; a family may also define `after_update(params, batch, rng, step) -> params` (e.g. the
  VQ tokenizer restarting dead codes), which its record declares (`Family.after_update`)."""

  def init(self, rng, batch: dict) -> Any:
    """The params (boxed, with logical axes) for example rows `batch`."""

  def loss_terms(self, params, batch: dict, rng, step) -> dict:
    """{term: summed loss over the batch} (scalars)."""

  def loss_counts(self, batch: dict) -> dict:
    """{term: how many targets its sum covers}; terms the counts lack are already normalised."""

  def combine(self, sums: dict, counts: dict) -> tuple[Any, dict]:
    """(the loss to differentiate, {metric: value}) from summed terms and counts."""

  def dummy_batch(self, batch_size: int, seq_len: int, image_shape) -> dict:
    """Example rows of the given shape (zeros): what `init` and tracing see."""


def _none(config, *args, **kwargs):
  del config, args, kwargs


def _no_defaults(config) -> None:
  del config


def _empty_list(config) -> list:
  del config
  return []


def standard_flops_per_token(config, matmul_params: int) -> float:
  """6·N (N = parameters in per-token matmuls) + 6·L·D·T for attention scores and values (12·L·D·T halved
  for the causal mask; T = the row length, an upper bound for packed rows)."""
  b = config.model.backbone
  return 6.0 * matmul_params + 6.0 * int(b.num_layers) * int(b.dim) * int(config.data.seq_len)


@dataclasses.dataclass(frozen=True)
class Family:
  """Everything the shared code needs to know about one family (see the module docstring).

  Callables take the run's config first. `load_frozen_codec(config)`: the frozen codec's params its
  checkpoint names (None when it needs none, or none is named: `build_task` then says what is missing);
  `random_frozen_codec(config, seed)`: random params in their place (benchmarks, compile-only runs,
  tests); `pretrained_parts(config)`: [(param path prefix, checkpoints dir, params → the part's)] a fresh
  run grafts in; `evaluate(config, task, params, tokenizer, **options)`: eval.json's dict;
  `image_generator` / `text_generator(task, params, specials, placement, code_sampling)`: the generators
  (None: the family writes no images / no text); `after_training(config, host params, step, checkpoints
  dir)`: what a finished run stores for its consumers; `memory_advice(config)`: family-specific ways to
  fit a step in memory (`--mode=compile`); `config_defaults(config)`: adds the family's own `config.model`
  keys with their defaults to a base config (and ties the `config.data` keys they decide to them):
  `configs/common.base_config(family)` calls it, so a config holds its family's keys and no other's."""

  name: str
  build_task: Callable[..., Task]  # (config, vocab_size, frozen_codec=None)
  config_defaults: Callable[[Any], None] = _no_defaults
  load_frozen_codec: Callable[[Any], Any] = _none
  random_frozen_codec: Callable[..., Any] = _none
  pretrained_parts: Callable[[Any], list] = _empty_list
  # Parameters that are not per-token matmuls (substrings of their '/'-joined paths): embedding tables,
  # an image encoder run once per image. The FLOP count (`flops_per_token`) leaves them out.
  non_matmul_params: tuple[str, ...] = ("embedding",)
  flops_per_token: Callable[[Any, int], float] = standard_flops_per_token  # (config, matmul params)
  evaluate: Callable[..., dict] | None = None
  image_generator: Callable[..., Any] | None = None
  text_generator: Callable[..., Any] | None = None
  after_update: bool = False  # the task updates params after each optimizer step (`Task` docstring)
  after_training: Callable[..., Any] | None = None
  memory_advice: Callable[[Any], list[str]] = _empty_list

  def is_matmul_param(self, path: str) -> bool:
    """Whether the parameter at '/'-joined `path` counts in the 6·N FLOPs per token."""
    return not any(k in path for k in self.non_matmul_params)

  @property
  def writes_images(self) -> bool:
    return self.image_generator is not None


_REGISTRY: dict[str, Family] = {}


def register(family: Family, *, replace: bool = False) -> Family:
  """Adds `family` under its name (`config.model.family`); a name already taken needs `replace=True`."""
  if family.name in _REGISTRY and not replace:
    raise ValueError(f"family {family.name!r} is already registered; pass replace=True to replace it")
  _REGISTRY[family.name] = family
  return family


def unregister(name: str) -> None:
  _REGISTRY.pop(name, None)


def names() -> list[str]:
  return sorted(_REGISTRY)


def get(name: str) -> Family:
  if name not in _REGISTRY:
    raise ValueError(f"unknown model family {name!r}; known: {names()} (a new one: families.register)")
  return _REGISTRY[name]


def of(config) -> Family:
  """`config.model.family`'s record."""
  return get(str(config.model.family))


def with_latent_stats(ae: autoencoders.AutoencoderConfig, frozen_codec):
  """(the autoencoder config with the latent shift/scale the diffusion uses, the VAE's params). A
  `FrozenVAE` (`load_vae`, `random_vae`) carries them resolved; bare params keep
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
  image_shape = layout.image_shape_of(d)
  if ae.kind != "identity" and frozen_codec is None and not ae.checkpoint:
    raise ValueError("config.model.autoencoder.kind='kl_vae' needs config.model.autoencoder.checkpoint "
                     "(train one with configs/vae/...) or frozen params passed in.")
  model = transfusion.TransfusionModel(
      vocab_size=text_vocabulary(config, vocab_size),
      backbone=backbone.BackboneConfig.from_config(m.backbone),
      latent_shape=ae.latent_shape(image_shape),
      max_images=int(d.max_images_per_row),
      patch_kind=m.patch_kind, patch_size=int(m.patch_size), patch_position=str(m.patch_position),
      unet_channels=tuple(m.unet_channels), unet_blocks=int(m.unet_blocks))
  return transfusion.TransfusionTask(
      model=model, autoencoder=ae, schedule=diffusion.Schedule.cosine(int(m.num_timesteps)),
      diffusion_weight=float(m.diffusion_weight), prediction=str(m.prediction), z_loss=float(m.z_loss),
      frozen_autoencoder=frozen_codec, image_shape=image_shape, lm_loss_chunk=int(m.lm_loss_chunk),
      tokenizer_ids=vocab_size or 0,
      clip_x0=float(m.clip_x0), objective=str(m.objective), flow_times=flow.TimeSampling.from_config(m.flow))


def autoencoder_task(config, vocab_size: int, frozen_codec=None) -> autoencoders.AutoencoderTask:
  """Trains config.model.autoencoder (kind kl_vae) itself."""
  del vocab_size, frozen_codec
  ae = autoencoders.AutoencoderConfig.from_config(config.model.autoencoder)
  if ae.kind != "kl_vae":
    raise ValueError(f"family kl_vae trains config.model.autoencoder.kind='kl_vae', got {ae.kind!r}")
  image_shape = layout.image_shape_of(config.data)
  ae.latent_shape(image_shape)  # checks downsample
  return autoencoders.AutoencoderTask(autoencoders.KLVAE(ae, image_shape[-1]),
                                      kl_weight=float(config.model.kl_weight), l1=bool(config.model.l1))


def chameleon_task(config, vocab_size: int, frozen_codec=None) -> chameleon.ChameleonTask:
  """Chameleon: the frozen VQ tokenizer of config.model.vq (its `checkpoint`) puts images in the vocabulary."""
  m, d = config.model, config.data
  cfg = vq.VQConfig.from_config(m.vq)
  if frozen_codec is None:
    raise ValueError("family chameleon needs a trained VQ tokenizer: set config.model.vq.checkpoint to a "
                     "configs/tokenizers/... run's checkpoints dir (or pass its params).")
  image_shape = layout.image_shape_of(d)
  text_vocab = text_vocabulary(config, vocab_size)
  model = chameleon.ChameleonModel(
      vocab_size=text_vocab + cfg.codebook_size, backbone=backbone.BackboneConfig.from_config(m.backbone),
      max_images=int(d.max_images_per_row), slots=int(d.image_slots))
  codes = code_images.CodeImages(vq.VQModel(cfg, image_shape[-1]), frozen_codec, text_vocab, image_shape)
  return chameleon.ChameleonTask(model=model, codes=codes, z_loss=float(m.z_loss), tokenizer_ids=vocab_size or 0,
                                 image_token_range=tuple(int(i) for i in m.get("image_token_range", (0, 0))))


def tokenizer_task(config, vocab_size: int, frozen_codec=None) -> vq.TokenizerTask:
  """Trains the VQ image tokenizer config.model.vq itself (configs/tokenizers/)."""
  del vocab_size, frozen_codec
  cfg = vq.VQConfig.from_config(config.model.vq)
  image_shape = layout.image_shape_of(config.data)
  cfg.grid(image_shape[:2])  # checks the downsampling divides the images
  return vq.TokenizerTask(vq.VQModel(cfg, image_shape[-1]),
                          vq.TokenizerLoss.from_config(config.model.vq_loss))


def janus_task(config, vocab_size: int, frozen_codec=None) -> janus.JanusTask:
  """Janus: ViT (model.vision) for images read, the frozen VQ tokenizer (model.vq.checkpoint) for images written."""
  if frozen_codec is None:
    raise ValueError("family janus needs a trained VQ tokenizer: set config.model.vq.checkpoint to a "
                     "configs/tokenizers/... run's checkpoints dir (or pass its params).")
  d = config.data
  image_shape = layout.image_shape_of(d)
  return janus.build(config, text_vocabulary(config, vocab_size), frozen_codec, image_shape, tokenizer_ids=vocab_size)


def siglip_task(config, vocab_size: int, frozen_codec=None) -> vit.SigLIPTask:
  """Pretrains the ViT of config.model.vision with the sigmoid image–text loss (for Janus to read with)."""
  del frozen_codec
  m = config.model
  cfg = vit.ViTConfig.from_config(m.vision)
  cfg.grid(layout.image_shape_of(config.data)[:2])  # checks the patch size divides the images
  model = vit.SigLIPModel(vit=cfg, text=backbone.BackboneConfig.from_config(m.siglip_text),
                          vocab_size=text_vocabulary(config, vocab_size), loss=vit.SigLIPLoss.from_config(m.siglip))
  return vit.SigLIPTask(model=model, max_images=int(config.data.max_images_per_row))


# -- each family's own config.model keys (configs/common.base_config(family) adds them) ---------------------
# The codec and encoder nodes are shared by the families that train or read them; `build_task` parses each
# node strictly into its settings class (`from_config`), so a key unknown there fails by name.

def autoencoder_node() -> mlc.ConfigDict:
  """`model.autoencoder`: pixels (identity) or a KL-VAE's latents. Its latents enter the diffusion as
  (z − shift)·scale. scale 0: from the VAE run's checkpoints/latent_stats.json (1/std of `stats_images`
  training images' latents; shift = their mean if `stats_center`), measured at the end of VAE training or
  on a consumer's first use; scale > 0 pins scale and shift (e.g. 0.18215 for an imported SD VAE) and the
  file is never read or written."""
  return mlc.ConfigDict(dict(
      kind="identity", downsample=mlc.FieldReference(1), latent_channels=8, channels=64,
      channel_mults=(1, 2, 2), blocks_per_level=1, shift=0.0, scale=0.0, checkpoint="", stats_images=1024,
      stats_center=False, layout="unimm", norm_groups=8, mid_attention=False, quant_conv=True))


def vq_node() -> mlc.ConfigDict:
  """`model.vq`: the VQ image tokenizer (LlamaGen's), trained by family vq, read frozen by the code
  families through `checkpoint`."""
  return mlc.ConfigDict(dict(
      channels=128, channel_mults=(1, 1, 2, 2, 4), blocks_per_level=2, attention=True, z_channels=256,
      codebook_size=16384, code_dim=8, l2_normalized=True, beta=0.25, entropy_temperature=0.01, checkpoint="",
      norm_groups=8, attention_levels=(), layout="unimm"))  # converted VQGANs' switches (unimm/models/vq.py)


def vision_node() -> mlc.ConfigDict:
  """`model.vision`: the ViT image encoder (SigLIP-L/16 at 384 px), trained by family siglip, read by Janus
  (its `checkpoint` names the siglip run whose ViT Janus starts from)."""
  return mlc.ConfigDict(dict(
      patch_size=16, width=1024, depth=24, num_heads=16, mlp_dim=4096, feature_layer=-1, dtype="bfloat16",
      remat=True, checkpoint="", gelu_exact=False))  # gelu_exact: erf GELU (a converted model's hidden_act="gelu")


def transfusion_defaults(config) -> None:
  m, d = config.model, config.data
  m.patch_kind = "linear"  # linear | unet (the paper's U-Net down/up blocks)
  m.patch_size = mlc.FieldReference(2)  # latent patch side (k×k latent pixels per slot)
  m.patch_position = "none"  # linear patches: none (1D RoPE only, the paper) | sincos (+ 2D sin-cos, DiT)
  m.unet_channels = (128, 256, 512)  # U-Net widths per level (log2(patch_size)+1 used)
  m.unet_blocks = 1
  m.autoencoder = autoencoder_node()
  m.diffusion_weight = 5.0  # λ in loss = LM + λ·diffusion
  m.num_timesteps = 1000
  m.objective = "ddpm"  # ddpm (the paper) | flow (rectified flow x_t = (1−t)x₀ + tε, velocity target ε − x₀)
  # the patch head's output: ddpm epsilon (the paper) | v (well posed at high noise); flow epsilon (the
  # velocity) | x0 (the clean image; its implied velocity is trained and sampled: unimm/flow.py)
  m.prediction = "epsilon"
  # flow's training times: uniform | logit_normal (SD3: σ(N(logit_mean, logit_std²))), then shifted
  # t ↦ s·t / (1 + (s−1)·t) (s > 1: more time at high noise; the samplers' time grid uses the same s)
  # read_shift: the shift of images that are read (captioning examples; 0: `shift`) — they are read clean at
  # inference, so they need no extra time at high noise.
  m.flow = mlc.ConfigDict(dict(time_sampling="uniform", shift=1.0, logit_mean=0.0, logit_std=1.0, read_shift=0.0))
  m.clip_x0 = -1.0  # samplers clip x̂₀ to [-c, c]: -1 auto (1 for pixels, off for KL-VAE latents), 0 off, c > 0
  m.lm_loss_chunk = 0  # > 0 computes the LM loss over chunks of this many positions (no [B, T, V] logits)
  grid = d.get_ref("image_size") // (m.get_ref("patch_size") * m.autoencoder.get_ref("downsample"))
  d.image_slots = grid * grid  # one per latent patch
  d.max_timestep = m.get_ref("num_timesteps")


def code_family_defaults(config) -> None:
  """Chameleon's and Janus's own keys: the frozen VQ tokenizer whose codes are their images (`model.vq`);
  Janus also reads images with a ViT (`model.vision`, added by `janus_defaults`)."""
  config.model.vq = vq_node()
  # [start, stop): text ids that are image tokens in a converted Chameleon's vocabulary (its codes live at
  # text_vocab + c as well): never sampled as text. (0, 0): none.
  config.model.image_token_range = (0, 0)


def janus_defaults(config) -> None:
  code_family_defaults(config)
  config.model.vision = vision_node()
  config.model.adaptor_gelu_exact = False  # the aligners' and image head's GELU: erf (a converted Janus) or tanh
  config.data.read_image_fit = "pad"  # Janus reads images letterboxed (its VLChatProcessor), writes them cropped


def kl_vae_defaults(config) -> None:
  m = config.model
  m.autoencoder = autoencoder_node()
  m.kl_weight = 1e-6  # weight of the KL term
  m.l1 = False  # L1 instead of L2 reconstruction


def vq_defaults(config) -> None:
  m = config.model
  m.vq = vq_node()
  m.vq_loss = mlc.ConfigDict(dict(  # see unimm/models/vq.py
      l1=False, codebook_weight=1.0, entropy_weight=0.0, perceptual_weight=0.0, perceptual_weights="",
      gan_weight=0.0, gan_start=0, disc_channels=64, disc_layers=3, reinit_dead_codes_every=0,
      reinit_dead_codes_until=0))


def siglip_defaults(config) -> None:
  m = config.model
  m.vision = vision_node()
  m.siglip = mlc.ConfigDict(dict(  # the loss and the shared embedding
      embed_dim=1024, init_temperature=10.0, init_bias=-10.0, duplicate_captions_positive=True))
  m.siglip_text = mlc.ConfigDict(dict(  # the text tower: a backbone (model.backbone's keys)
      num_layers=12, dim=768, num_heads=12, num_kv_heads=0, head_dim=0, mlp_hidden=0, qk_norm=False,
      rope_theta=10000.0, norm_eps=1e-5, dtype="bfloat16", remat="dots_no_batch", scan=True,
      bidirectional_images=True, attention="auto", dropout=0.0, norm_order="pre"))


# -- frozen codecs: loaded from the run their checkpoint names, or random stand-ins -----------------------

def _restore_params(directory: str):
  from unimm.train import checkpoint  # pylint: disable=g-import-not-at-top  (orbax: only when loading)
  return checkpoint.Checkpointer(directory, async_save=False).restore_params()


def load_vq_tokenizer(config):
  """A code family's frozen VQ tokenizer (model.vq.checkpoint), or None if the config names none."""
  if not config.model.vq.checkpoint:
    return None  # the family's build_task says what it needs
  return code_images.tokenizer_params(_restore_params(config.model.vq.checkpoint))


def load_vae(config):
  """Transfusion's KL-VAE (model.autoencoder.checkpoint) as a `FrozenVAE` with the latent shift/scale the
  diffusion uses (resolved here, once, for training, eval and sampling alike: `latent_stats.resolve`);
  None with the identity autoencoder (pixels) or no checkpoint named (`transfusion_task` says so)."""
  from unimm.train import checkpoint, latent_stats  # pylint: disable=g-import-not-at-top
  ae = config.model.autoencoder
  if ae.kind == "identity" or not ae.checkpoint:
    return None
  ckpt = checkpoint.Checkpointer(ae.checkpoint, async_save=False)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint in config.model.autoencoder.checkpoint={ae.checkpoint!r}: "
                            "train the VAE first (configs/vae/...) or point it at the VAE run's checkpoints dir")
  params = ckpt.restore_params(step)
  shift, scale = latent_stats.resolve(config, params, step)
  return autoencoders.FrozenVAE(params, shift=shift, scale=scale)


def _example_image(config):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  d = config.data
  return jnp.zeros((1, *layout.image_shape_of(d)), jnp.uint8)


def random_vq_tokenizer(config, seed: int = 0):
  """Random params of the VQ tokenizer of `config.model.vq`: shapes and cost are what matter."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  image = _example_image(config)
  model = vq.VQModel(vq.VQConfig.from_config(config.model.vq), image.shape[-1])
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), image)["params"])


def random_vae(config, seed: int = 0):
  """A `FrozenVAE` of random weights (no statistics to read: shift 0, scale 1), or None for pixels."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  ae = autoencoders.AutoencoderConfig.from_config(config.model.autoencoder)
  if ae.kind != "kl_vae":
    return None
  image = _example_image(config)
  vae = autoencoders.KLVAE(ae, image.shape[-1])
  params = nn.meta.unbox(jax.jit(vae.init)(jax.random.key(seed), image, jax.random.key(1))["params"])
  return autoencoders.FrozenVAE(params, shift=0.0, scale=1.0)


def janus_pretrained_parts(config) -> list[tuple[str, str, Callable]]:
  """Janus: the SigLIP run's ViT (model.vision.checkpoint) as the `vision_encoder`."""
  if config.model.vision.checkpoint:
    return [("vision_encoder", config.model.vision.checkpoint, janus.vision_params)]
  return []


# -- generators: every family's take the same prompts and are called the same way ---------------------------

def _code_options(code_sampling) -> codes.CodeSampling:
  if code_sampling is None:
    return codes.CodeSampling()
  return codes.CodeSampling(**dataclasses.asdict(code_sampling))


def diffusion_image_generator(task, params, specials, placement=None, code_sampling=None):
  del code_sampling  # no codes: images are denoised
  return images.ImageGenerator(task, params, specials, placement)


def diffusion_text_generator(task, params, specials, placement=None, code_sampling=None):
  del code_sampling
  return text.TextGenerator(text.DiffusionStepper(task, params, specials, placement))


def code_image_generator(task, params, specials, placement=None, code_sampling=None):
  """`code_sampling`: temperature / top-k / top-p over image codes (default temperature 1)."""
  return codes.CodeImageGenerator(task, params, specials, placement, _code_options(code_sampling))


def code_text_generator(task, params, specials, placement=None, code_sampling=None):
  return text.TextGenerator(codes.CodeStepper(task, params, specials, placement, _code_options(code_sampling)))


# -- evaluators (the evaluation module asks this registry for generators, so it is imported when used) ----

def evaluate_unified(*args, **kwargs) -> dict:
  from unimm.eval import evaluate  # pylint: disable=g-import-not-at-top
  return evaluate.evaluate_unified(*args, **kwargs)


def evaluate_vq_tokenizer(config, task, params, tokenizer, *, num_examples: int = 200, out_dir=None, **unused):
  from unimm.eval import evaluate  # pylint: disable=g-import-not-at-top
  del tokenizer, unused
  return {"tokenizer": evaluate.evaluate_tokenizer(config, task, params, num_examples=num_examples, out_dir=out_dir)}


def evaluate_siglip(config, task, params, tokenizer, *, num_examples: int = 200, **unused):
  from unimm.eval import evaluate  # pylint: disable=g-import-not-at-top
  del unused
  return {"zero_shot": evaluate.evaluate_siglip(config, task, params, tokenizer, num_examples=num_examples)}


def record_latent_stats(config, params, step: int, directory: str):
  """A finished kl_vae run: its consumers diffuse in (z − shift)·scale, measured once on the final params."""
  from unimm.train import latent_stats  # pylint: disable=g-import-not-at-top
  return latent_stats.record_after_training(config, params, step, directory)


def transfusion_memory_advice(config) -> list[str]:
  if not int(config.model.lm_loss_chunk):
    return ["compute the LM loss without the [B, T, V] logits: --config.model.lm_loss_chunk=512"]
  return []


# -- the built-in families --------------------------------------------------------------------------------

for _family in (
    Family("transfusion", transfusion_task, transfusion_defaults, load_frozen_codec=load_vae,
           random_frozen_codec=random_vae, evaluate=evaluate_unified, image_generator=diffusion_image_generator,
           text_generator=diffusion_text_generator, memory_advice=transfusion_memory_advice),
    Family("chameleon", chameleon_task, code_family_defaults, load_frozen_codec=load_vq_tokenizer,
           random_frozen_codec=random_vq_tokenizer, evaluate=evaluate_unified, image_generator=code_image_generator,
           text_generator=code_text_generator),
    Family("janus", janus_task, janus_defaults, load_frozen_codec=load_vq_tokenizer,
           random_frozen_codec=random_vq_tokenizer, pretrained_parts=janus_pretrained_parts,
           non_matmul_params=("embedding", "gen_embed", "vision_encoder"), evaluate=evaluate_unified,
           image_generator=code_image_generator, text_generator=code_text_generator),
    Family("kl_vae", autoencoder_task, kl_vae_defaults, after_training=record_latent_stats),
    Family("vq", tokenizer_task, vq_defaults, evaluate=evaluate_vq_tokenizer, after_update=True),
    Family("siglip", siglip_task, siglip_defaults, evaluate=evaluate_siglip),
):
  register(_family)


def build_task(config, vocab_size: int | None, **kwargs) -> Task:
  """`config`'s task; `vocab_size`: the ids the tokenizer emits (None: none at hand, the config declares
  the vocabulary — see `text_vocabulary`)."""
  family = of(config)
  if config.model.backbone.remat == "auto":  # built outside a training setup (eval, sample, tools): this host's
    from unimm.parallel import targets  # pylint: disable=g-import-not-at-top
    config = targets.resolve_targets(config, targets.platform_of())
  return family.build_task(config, vocab_size, **kwargs)


def load_frozen_codec(config):
  """The frozen image codec's params `config`'s family reads images with (see `Family`)."""
  return of(config).load_frozen_codec(config)


def random_frozen_codec(config, seed: int = 0):
  """Random params in place of the family's frozen codec (None if it needs none)."""
  return of(config).random_frozen_codec(config, seed)
