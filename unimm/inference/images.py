"""Image generation for Transfusion with a KV cache of the prompt.

Each prompt (text and any clean images, then `BOI`) and its unconditional
twin `BOS BOI` (classifier-free guidance) are prefilled once, left-padded in
one batch. Every denoising step then runs only the new image's slots — the
noised latent's patches plus the timestep embedding — against that cache; the
cache after prefill is reused unchanged, since a step's writes are discarded.
The task's objective picks the sampler (DDPM: DDIM or ancestral; flow: Euler
or Heun); the cached step is the same for both.
`denoise` is that loop on its own: text generation calls it when the model
emits `BOI` mid-text (`unimm.inference.text`). Guidance None skips the
unconditional rows (conditional sampling, half the work).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from unimm.data import packed
from unimm.inference import cache as cache_lib, placement as placement_lib, prompts as prompts_lib


@dataclasses.dataclass(frozen=True)
class DiffusionOptions:
  num_steps: int = 250  # the paper's default
  guidance: float | None = 3.0  # classifier-free guidance scale (the paper: 3–5); None: conditional only
  sampler: str | None = None  # ddim | ddpm (objective ddpm), euler | heun (flow); None: the objective's first


class ImageGenerator:

  def __init__(self, task, params, specials, placement: placement_lib.Placement | None = None):
    self.task = task
    self.model = dataclasses.replace(task.model, decode=True)
    self.placement = placement or placement_lib.Placement.single_device()
    self.params = self.placement.params(self.model, params)
    self.specials = specials

    def run(params, cache, rows, latents, t):
      (_, out), mutated = self.model.apply({"params": params, "cache": cache}, rows, latents, t, mutable=["cache"])
      return out, mutated["cache"]
    self._run = jax.jit(run)

    m, latent_shape = self.model.max_images, self.model.latent_shape

    def denoise_step(params, cache, rows, image_index, x, time):
      """What the sampler takes (ε, or flow's v) for the new image x [B, h, w, c] (at `image_index` of each
      row) at the model's time input [B], from one pass over its slots against the cache; the step's cache
      writes are dropped (XLA need not return them)."""
      b = x.shape[0]
      latents = jnp.zeros((b, m, *latent_shape), jnp.float32).at[jnp.arange(b), image_index].set(x)
      (_, out), _ = self.model.apply({"params": params, "cache": cache}, rows, latents,
                                     jnp.broadcast_to(time[:, None], (b, m)), mutable=["cache"])
      return self.task.sampler_input(out[jnp.arange(b), image_index], x, time)
    self._denoise_step = jax.jit(denoise_step)
    # The frozen autoencoder as two compiled programs, not op by op.
    self._encode = jax.jit(self.task.encode_images)
    self._decode = jax.jit(lambda latents: self.task.decode_latents(latents, self.task.image_shape[-1]))

  def generate(self, prompts: list[prompts_lib.Prompt], rng, *, num_steps: int = 50,
               guidance: float | None = 3.0, sampler: str | None = None) -> np.ndarray:
    """uint8 images [N, H, W, C], one per prompt (BOI is appended here); guidance None: no CFG."""
    s, n = self.specials, len(prompts)
    m, slots = self.model.max_images, self.model.slots
    bos_only = prompts_lib.Prompt([s.bos], [0], [])
    prompts = placement_lib.pad_to_multiple(list(prompts), self.placement.batch_multiple, bos_only)
    cond = [prompts_lib.Prompt(p.tokens + [s.boi], p.image_ids + [0], p.images) for p in prompts]
    uncond = [prompts_lib.Prompt([s.bos, s.boi], [0, 0], [])] * (len(prompts) if guidance is not None else 0)
    rows, images = prompts_lib.batch(cond + uncond, pad_id=s.pad, max_images=m, image_shape=self.task.image_shape)
    b, length = rows.tokens.shape
    new_image = np.array([len(p.images) for p in cond + uncond])  # index of the image being generated
    if (new_image >= m).any():
      raise ValueError(f"a prompt already holds {int(new_image.max())} images; the model takes {m} per row")
    cache = cache_lib.empty(self.model, b, cache_lib.bucket(length + slots), self.placement)
    with self.placement.context():
      clean = self._encode(self.placement.rows(images))
      _, cache = self._run(self.params, cache, self.placement.rows(rows), clean, jnp.zeros((b, m), jnp.int32))
    first_slot = np.array([len(p) for p in cond + uncond])
    x = self.denoise(cache, first_slot, new_image, rng,
                     DiffusionOptions(num_steps=num_steps, guidance=guidance, sampler=sampler))
    return self.to_pixels(x)[:n]

  def denoise(self, cache, first_slot: np.ndarray, image_index: np.ndarray, rng,
              options: DiffusionOptions) -> jnp.ndarray:
    """Latents [N, h, w, c] for a cache of 2N rows [conditional; unconditional] written up to `BOI`
    (N conditional rows when `options.guidance` is None).

    first_slot: each row's position of the new image's first slot; image_index: the image's
    index in its row. The cache is only read: each step's writes are dropped.
    """
    b = len(first_slot)
    guided = options.guidance is not None
    if guided and b % 2:
      raise ValueError(f"guided denoising takes conditional and unconditional rows in pairs, got {b} rows")
    n, slots = b // 2 if guided else b, self.model.slots
    with self.placement.context():
      # Each row's new image: its slots, at the row's next positions.
      slots_rows = packed.Rows.padded([([self.specials.img] * slots, [k + 1] * slots) for k in image_index], slots,
                                      self.specials.pad, first_positions=first_slot)
      dev, image_index = self.placement.rows((slots_rows, np.asarray(image_index, np.int32)))

    def denoiser(x2, time):
      with self.placement.context():
        # Every step's x placed like the rows: one compiled step, whatever sharding the sampler's update left.
        x2, time = jax.device_put((x2, time), self.placement.batch_sharding)
        return self._denoise_step(self.params, cache, dev, image_index, x2, time)

    noise = jax.random.normal(rng, (n, *self.model.latent_shape), jnp.float32)
    return self.task.sample_latents(denoiser, noise, jax.random.fold_in(rng, 1), num_steps=options.num_steps,
                                    guidance=options.guidance, sampler=options.sampler)

  def to_pixels(self, latents) -> np.ndarray:
    return np.asarray(self._decode(latents))
