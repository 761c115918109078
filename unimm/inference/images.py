"""Image generation for Transfusion with a KV cache of the prompt.

Each prompt (text and any clean images, then `BOI`) and its unconditional
twin `BOS BOI` (classifier-free guidance) are prefilled once, left-padded in
one batch. Every denoising step then runs only the new image's slots — the
noised latent's patches plus the timestep embedding — against that cache; the
cache after prefill is reused unchanged, since a step's writes are discarded.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from unimm import diffusion
from unimm.inference import prompts as prompts_lib
from unimm.inference.text import empty_cache


class ImageGenerator:

  def __init__(self, task, params, specials):
    self.task = task
    self.model = dataclasses.replace(task.model, decode=True)
    self.params = params
    self.specials = specials

    def run(params, cache, tokens, positions, segments, image_ids, latents, t):
      (_, eps), mutated = self.model.apply({"params": params, "cache": cache}, tokens, positions, segments,
                                           image_ids, latents, t, mutable=["cache"])
      return eps, mutated["cache"]
    self._run = jax.jit(run)

  def generate(self, prompts: list[prompts_lib.Prompt], rng, *, num_steps: int = 50, guidance: float = 3.0,
               sampler: str = "ddim") -> np.ndarray:
    """uint8 images [N, H, W, C], one per prompt (BOI is appended here)."""
    s = self.specials
    m, slots = self.model.max_images, self.model.slots
    cond = [prompts_lib.Prompt(p.tokens + [s.boi], p.image_ids + [0], p.images) for p in prompts]
    uncond = [prompts_lib.Prompt([s.bos, s.boi], [0, 0], [])] * len(prompts)
    rows = prompts_lib.batch(cond + uncond, pad_id=s.pad, max_images=m, image_shape=self.task.image_shape)
    b, length = rows["tokens"].shape
    new_image = np.array([len(p.images) for p in cond + uncond])  # index of the image being generated
    if (new_image >= m).any():
      raise ValueError(f"a prompt already holds {int(new_image.max())} images; the model takes {m} per row")
    cache = empty_cache(self.model, b, length + slots)
    clean = self.task.encode_images(jnp.asarray(rows["images"]))
    _, cache = self._run(self.params, cache, *(jnp.asarray(rows[k]) for k in
                                               ("tokens", "positions", "segment_ids", "image_ids")),
                         clean, jnp.zeros((b, m), jnp.int32))
    tokens = jnp.full((b, slots), s.img, jnp.int32)
    positions = jnp.asarray(np.array([len(p) for p in cond + uncond])[:, None] + np.arange(slots), jnp.int32)
    segments = jnp.ones((b, slots), jnp.int32)
    image_ids = jnp.asarray(np.repeat(new_image[:, None] + 1, slots, axis=1), jnp.int32)
    rows_index = jnp.arange(b)

    def eps_fn(x2, t):
      latents = jnp.zeros((b, m, *self.model.latent_shape), jnp.float32).at[rows_index, new_image].set(x2)
      eps, _ = self._run(self.params, cache, tokens, positions, segments, image_ids, latents,
                         jnp.full((b, m), t, jnp.int32))
      return eps[rows_index, new_image]

    noise = jax.random.normal(rng, (len(prompts), *self.model.latent_shape), jnp.float32)
    x = diffusion.sample(self.task.schedule, eps_fn, noise, num_steps=num_steps, guidance=guidance,
                         sampler=sampler, rng=jax.random.fold_in(rng, 1))
    return np.asarray(self.task.decode_latents(x, self.task.image_shape[-1]))
