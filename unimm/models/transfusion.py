"""Transfusion (arXiv 2408.11039): next-token prediction on text, diffusion on images.

One backbone reads a packed row in which image slots hold patch vectors of the
*noised* image latent (plus a timestep embedding) and text slots hold token
embeddings. The LM head's next-token loss covers text; the patch layer's
inverse maps the image slots' outputs to a predicted noise ε (or v, by
`model.prediction`), trained with the DDPM mean squared error — or, with
`model.objective=flow`, to the rectified-flow velocity ε − x₀ (`unimm.flow`).
Loss = LM loss (mean over text targets) + λ · diffusion loss (mean over
images), λ = 5.

`TransfusionTask` is the family's task (`unimm.families.Task`: `init`,
`loss_terms`, `loss_counts`, `combine`, `dummy_batch`) and what its generators
read; the backbone, patch layers, autoencoder and diffusion are the shared
parts it composes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimm import diffusion, flow
from unimm.data import layout, packed
from unimm.models import autoencoders, axes, backbone, layers, losses, patches, slots as slots_lib


class TransfusionModel(nn.Module):
  vocab_size: int
  backbone: backbone.BackboneConfig
  latent_shape: tuple[int, int, int]
  max_images: int
  patch_kind: str = "linear"  # linear | unet
  patch_size: int = 2
  patch_position: str = "none"  # linear patches: none | sincos (2D position embeddings, patches.LinearPatch)
  unet_channels: tuple[int, ...] = (64, 128, 256)
  unet_blocks: int = 1
  decode: bool = False  # run the backbone through its KV cache (inference)

  def setup(self):
    c = self.backbone
    dt = c.compute_dtype
    self.embed = layers.Embed(self.vocab_size, c.dim, dtype=dt)
    self.time = layers.TimestepMLP(c.dim, dtype=dt)
    if self.patch_kind == "linear":
      self.patch = patches.LinearPatch(self.patch_size, c.dim, self.latent_shape, position=self.patch_position,
                                       dtype=dt)
    elif self.patch_kind == "unet":
      if self.patch_position != "none":  # its convolutions see where they are; nothing to add positions to
        raise ValueError(f"model.patch_position={self.patch_position!r} is for linear patches; with "
                         "model.patch_kind='unet' leave it 'none'")
      self.patch = patches.UNetPatch(self.patch_size, c.dim, self.latent_shape, channels=self.unet_channels,
                                     blocks_per_level=self.unet_blocks, dtype=dt)
    else:
      raise ValueError(f"patch kind {self.patch_kind!r}; expected 'linear' or 'unet'")
    self.decoder = backbone.Backbone(c, decode=self.decode)
    self.lm_head = layers.DenseGeneral((self.vocab_size,), (axes.EMBED,), (axes.VOCAB,), dtype=dt,
                                       out_dtype=jnp.float32)

  @property
  def slots(self) -> int:
    h, w, _ = self.latent_shape
    return (h // self.patch_size) * (w // self.patch_size)

  def dummy_inputs(self, batch: int, length: int) -> tuple:
    """Arguments of `__call__` for `batch` rows of `length` slots (to size params and caches)."""
    latents = jnp.zeros((batch, self.max_images, *self.latent_shape), jnp.float32)
    return packed.Rows.one_document(batch, length), latents, jnp.zeros((batch, self.max_images), jnp.int32)

  def __call__(self, rows: packed.Rows, noisy_latents, timesteps, return_hidden=False):
    """→ logits [B, T, V] (float32), image output [B, M, h, w, c] (ε or v, see TransfusionTask.prediction).

    `return_hidden`: the final hidden states [B, T, D] instead of the logits (chunked LM loss).
    """
    x = self.embed(rows.tokens)
    t_emb = self.time(timesteps)
    image_vectors, aux = self.patch.encode(noisy_latents, t_emb)
    x = slots_lib.scatter(x, image_vectors, rows.image_ids)
    h = self.decoder(x, rows.positions, rows.segment_ids, rows.image_ids)
    eps = self.patch.decode(slots_lib.gather(h, rows.image_ids, self.max_images, self.slots), t_emb, aux)
    if return_hidden:
      if self.is_initializing():
        self.lm_head(h[:, :1])  # create the head's params
      return h, eps.astype(jnp.float32)
    logits = layers.constrain(self.lm_head(h), (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_VOCAB))
    return logits, eps.astype(jnp.float32)


@dataclasses.dataclass
class TransfusionTask:
  """The Transfusion family for the trainer: params, loss, sampling."""

  model: TransfusionModel
  autoencoder: autoencoders.AutoencoderConfig
  schedule: diffusion.Schedule
  diffusion_weight: float = 5.0
  z_loss: float = 0.0
  frozen_autoencoder: Any = None  # kl_vae params, or None for identity
  image_shape: tuple[int, int, int] = (0, 0, 0)  # H, W, C of the pixels the autoencoder takes
  prediction: str = "epsilon"  # the patch head's output: DDPM epsilon (the paper) | v; flow: epsilon (v) | x0
  lm_loss_chunk: int = 0  # > 0: the LM loss in chunks of this many positions, no [B, T, V] logits
  tokenizer_ids: int = 0  # ids the tokenizer emits; [tokenizer_ids, vocab_size) is padding, never sampled
  clip_x0: float = -1.0  # model.clip_x0: -1 auto (pixels 1.0, a KL-VAE's unbounded latents off), 0 off, c > 0
  objective: str = "ddpm"  # ddpm (the paper: discrete t, cosine schedule) | flow (rectified flow, v = ε − x₀)
  flow_times: flow.TimeSampling = flow.TimeSampling()  # flow's training-time distribution and shift

  @property
  def x0_clip(self) -> float | None:
    """The bound every sampler clips x̂₀ to (None: no clipping), see `diffusion.x0_clip`."""
    return diffusion.x0_clip(self.clip_x0, latents_bounded=self.autoencoder.kind == "identity")

  def to_epsilon(self, output, x_t, t):
    """A DDPM model's image output at x_t, timestep t [...] → ε, what DDPM's samplers take."""
    return diffusion.to_epsilon(self.schedule, self.prediction, output, x_t, t)

  def noised(self, rng_t, rng_noise, latents, t_max):
    """(x_t, the model's time input, the training target) for clean latents [B, M, ...] and each image's noise
    limit t_max [B, M] in DDPM steps (`data.max_timestep`, or the captioning cap `data.noise_limit_t`).

    DDPM: integer t < t_max, target ε or v. Flow: t ∈ [0, t_max / T] by `flow_times`, read by the model
    as t·T, target v = ε − x₀ — so one noise limit caps both objectives at the same fraction of the way.
    """
    noise = jax.random.normal(rng_noise, latents.shape, jnp.float32)
    if self.objective == "flow":
      steps = self.schedule.num_timesteps
      t = self.flow_times.draw(rng_t, t_max.astype(jnp.float32) / steps)
      return flow.interpolate(latents, noise, t), t * steps, flow.velocity(latents, noise)
    t = diffusion.sample_timesteps(rng_t, t_max)
    return (diffusion.add_noise(self.schedule, latents, noise, t), t,
            diffusion.target(self.schedule, self.prediction, latents, noise, t))

  def sampler(self, name: str | None = None) -> str:
    """The sampler `name` after checking it fits the objective; None: the objective's default."""
    allowed = flow.SAMPLERS if self.objective == "flow" else diffusion.SAMPLERS
    if name is None:
      return allowed[0]
    if name not in allowed:
      raise ValueError(f"sampler {name!r} does not sample objective={self.objective!r}; expected one of {allowed}")
    return name

  def sampler_input(self, output, x_t, time):
    """The model's image output at x_t and time input [...] → what the sampler integrates: ε for DDPM
    (converted from v), the velocity for flow (as output, or implied by an x̂₀, clipped to the bound)."""
    if self.objective == "flow":
      return self.flow_velocity(output, x_t, time, clip=self.x0_clip)
    return self.to_epsilon(output, x_t, time)

  def flow_velocity(self, output, x_t, time, clip: float | None = None):
    """Flow: the velocity the head's output means at x_t and the model's time input (t·T)."""
    if self.prediction != "x0":
      return output
    return flow.velocity_from_x0(output, x_t, time / self.schedule.num_timesteps, clip)

  def sample_latents(self, denoiser, noise, rng, *, num_steps: int, guidance: float | None,
                     sampler: str | None = None):
    """Latents from `noise` [N, ...] by the objective's sampler. `denoiser(x [K, ...], time [K])` →
    `sampler_input` at the model's time input (int32 DDPM steps, or float32 t·T for flow), for the 2N rows
    [conditional; unconditional] with guidance, the N conditional rows without (guidance None)."""
    sampler = self.sampler(sampler)
    if self.objective == "flow":
      steps = self.schedule.num_timesteps
      return flow.sample(lambda x, t: denoiser(x, jnp.full((x.shape[0],), t * steps, jnp.float32)), noise,
                         num_steps=num_steps, sampler=sampler, guidance=guidance, shift=self.flow_times.shift)
    return diffusion.sample(self.schedule, lambda x, t: denoiser(x, jnp.full((x.shape[0],), t, jnp.int32)), noise,
                            num_steps=num_steps, clip=self.x0_clip, guidance=guidance, sampler=sampler, rng=rng)

  def __post_init__(self):
    if self.objective not in OBJECTIVES:
      raise ValueError(f"model.objective={self.objective!r}; expected one of {OBJECTIVES}")
    if self.objective == "flow" and self.prediction not in flow.PREDICTIONS:
      raise ValueError(f"model.prediction={self.prediction!r} with objective=flow: the head predicts the velocity "
                       f"ε − x₀ (epsilon, the default) or the clean image (x0); expected one of {flow.PREDICTIONS}")
    if self.objective == "ddpm":
      diffusion.check_prediction(self.prediction)
    diffusion.x0_clip(self.clip_x0, latents_bounded=True)  # a bad setting fails here, not when sampling

    def image_output(params, rows, latents, t):
      _, out = self.model.apply({"params": params}, rows, latents, t)
      return out
    self._image_output = jax.jit(image_output)  # one compiled denoiser per task, reused across sampling calls

  def dummy_batch(self, batch_size: int, seq_len: int, image_shape) -> dict:
    return packed.example_batch(batch_size, seq_len, self.model.max_images, image_shape)

  def init(self, rng, batch: dict):
    b, m = batch["images"].shape[:2]
    latents = jnp.zeros((b, m, *self.model.latent_shape), jnp.float32)
    return self.model.init(rng, packed.Rows.of(batch), latents, jnp.zeros((b, m), jnp.int32))["params"]

  def encode_images(self, images, rng=None):
    """uint8 [B, M, H, W, C] → latents [B, M, h, w, c]."""
    if self.autoencoder.kind == "identity":
      return autoencoders.to_unit(images)
    b, m = images.shape[:2]
    vae = autoencoders.KLVAE(self.autoencoder, images.shape[-1])
    z = vae.apply({"params": self.frozen_autoencoder}, images.reshape(b * m, *images.shape[2:]), rng,
                  method=vae.encode)
    return jax.lax.stop_gradient(z).reshape(b, m, *z.shape[1:])

  def decode_latents(self, latents, image_channels: int):
    """latents [N, h, w, c] → uint8 images."""
    if self.autoencoder.kind == "identity":
      return autoencoders.to_uint8(latents)
    vae = autoencoders.KLVAE(self.autoencoder, image_channels)
    return autoencoders.to_uint8(vae.apply({"params": self.frozen_autoencoder}, latents, method=vae.decode))

  def logits(self, params, batch: dict):
    """Next-token logits of packed rows [B, T, V], images read clean (t = 0)."""
    latents = self.encode_images(batch["images"])
    t = jnp.zeros(batch["images"].shape[:2], jnp.int32)
    logits, _ = self.model.apply({"params": params}, packed.Rows.of(batch), latents, t)
    return logits

  def loss_terms(self, params, batch: dict, rng, step=0) -> dict:
    """Unnormalised sums: the trainer divides by counts over the whole (accumulated) batch."""
    del step
    rng_t, rng_noise, rng_vae, rng_dropout = jax.random.split(rng, 4)
    latents = self.encode_images(batch["images"], rng_vae)
    noisy, t, target = self.noised(rng_t, rng_noise, latents, batch["image_t_max"])
    chunked = self.lm_loss_chunk > 0
    logits_or_hidden, out = self.model.apply(
        {"params": params}, packed.Rows.of(batch), noisy, t, return_hidden=chunked, rngs={"dropout": rng_dropout})
    weights = batch["loss_weights"][:, :-1]
    if chunked:  # every position's hidden state; the last (no next token) with weight 0
      pad = lambda x: jnp.pad(x, ((0, 0), (0, 1)))
      lm_sum, z_sum = losses.chunked_cross_entropy(logits_or_hidden, params["lm_head"]["kernel"],
                                                   pad(batch["tokens"][:, 1:]), pad(weights),
                                                   chunk=self.lm_loss_chunk, z_loss=self.z_loss,
                                                   dtype=self.model.backbone.compute_dtype)
    else:
      lm_sum, z_sum = losses.cross_entropy(logits_or_hidden[:, :-1], batch["tokens"][:, 1:], weights, self.z_loss)
    if self.objective == "flow" and self.prediction == "x0":
      # x̂₀ heads train through the velocity they imply, against the true x₀'s with the same clamped t
      # (= ε − x₀ where t ≥ X0_MIN_T): the loss is ‖x̂₀ − x₀‖² / max(t, X0_MIN_T)², minimal at x̂₀ = x₀ for all t.
      out, target = self.flow_velocity(out, noisy, t), self.flow_velocity(latents, noisy, t)
    per_image = diffusion.per_image_error(out, target)
    valid = batch["image_valid"].astype(jnp.float32)
    return {"lm": lm_sum, "z": z_sum, "diffusion": jnp.sum(per_image * valid)}

  @staticmethod
  def loss_counts(batch: dict) -> dict:
    return {"lm": jnp.sum(batch["loss_weights"][:, :-1]), "diffusion": jnp.sum(batch["image_valid"])}

  def combine(self, sums: dict, counts: dict) -> tuple[jnp.ndarray, dict]:
    """Total loss and its parts from sums and whole-batch counts."""
    lm = sums["lm"] / jnp.maximum(counts["lm"], 1.0)
    z = sums["z"] / jnp.maximum(counts["lm"], 1.0)
    diff = sums["diffusion"] / jnp.maximum(counts["diffusion"], 1.0)
    total = lm + z + self.diffusion_weight * diff
    return total, {"lm_loss": lm, "diffusion_loss": diff, "z_loss": z}

  def sample_images(self, params, prompts: np.ndarray, prompt_lengths: np.ndarray, rng, *, specials,
                    num_steps: int = 50, guidance: float = 3.0, image_channels: int = 3, sampler: str | None = None):
    """Images for caption prompts by re-running the whole row at every denoising step.

    prompts [N, L] token ids (caption only, no BOS), prompt_lengths [N]. Conditional
    and unconditional (empty caption) rows run as one batch. This is the
    reference; `unimm.inference.images` runs only the image slots against a
    KV cache of the prompt.
    """
    captions = [prompts[i, :int(n)].tolist() for i, n in enumerate(prompt_lengths)]
    both = image_prompt_rows(captions + [[]] * len(captions), self.model.slots, specials)
    m = self.model.max_images

    def denoiser(x2, time):
      latents = jnp.zeros((x2.shape[0], m, *self.model.latent_shape)).at[:, 0].set(x2)
      out = self._image_output(params, both, latents, jnp.broadcast_to(time[:, None], (x2.shape[0], m)))[:, 0]
      return self.sampler_input(out, x2, time)

    noise = jax.random.normal(rng, (prompts.shape[0], *self.model.latent_shape), jnp.float32)
    x = self.sample_latents(denoiser, noise, jax.random.fold_in(rng, 1), num_steps=num_steps, guidance=guidance,
                            sampler=sampler)
    return np.asarray(self.decode_latents(x, image_channels))


OBJECTIVES = ("ddpm", "flow")


def image_prompt_rows(captions: list[list[int]], slots: int, specials) -> packed.Rows:
  """Rows `BOS caption BOI <slots> EOI` (one document each, right-padded) for text→image sampling."""
  documents = [layout.lay_out([caption, layout.IMAGE], specials, slots) for caption in captions]
  length = max(len(tokens) for tokens, _ in documents)
  return jax.tree.map(jnp.asarray, packed.Rows.padded(documents, length, specials.pad))
