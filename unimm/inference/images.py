"""Text→image generation for Transfusion with a KV cache of the prompt.

The prompts `BOS caption BOI` (conditional) and `BOS BOI` (unconditional, for
classifier-free guidance) are prefilled once, left-padded in one batch. Each
denoising step then runs only the image's slots (the noised latent's patches
plus the timestep embedding) against that cache — the cache after prefill is
reused unchanged, since a step's writes into the image slots are discarded.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from unimm import diffusion
from unimm.inference.text import left_pad


class ImageGenerator:

  def __init__(self, task, params, specials):
    self.task = task
    self.model = dataclasses.replace(task.model, decode=True)
    self.params = params
    self.specials = specials
    m = self.model.max_images

    def run(params, cache, tokens, positions, segments, image_ids, latents, t):
      (_, eps), mutated = self.model.apply({"params": params, "cache": cache}, tokens, positions, segments,
                                           image_ids, latents, jnp.full((tokens.shape[0], m), t, jnp.int32),
                                           mutable=["cache"])
      return eps[:, 0], mutated["cache"]
    self._run = jax.jit(run)

  def _latents(self, x):
    shape = (x.shape[0], self.model.max_images, *self.model.latent_shape)
    return jnp.zeros(shape, jnp.float32).at[:, 0].set(x)

  def generate(self, prompts: list[list[int]], rng, *, num_steps: int = 50, guidance: float = 3.0,
               sampler: str = "ddim", image_channels: int = 3) -> np.ndarray:
    """uint8 images [N, H, W, C] for caption token lists (no BOS)."""
    s = self.specials
    rows = [[s.bos, *p, s.boi] for p in prompts] + [[s.bos, s.boi]] * len(prompts)
    tokens, positions, segments = left_pad(rows, s.pad)
    b, length = tokens.shape
    slots = self.model.slots
    cache_shapes = jax.eval_shape(lambda: self.model.init(
        jax.random.key(0), jnp.zeros((b, length + slots), jnp.int32), jnp.zeros((b, length + slots), jnp.int32),
        jnp.zeros((b, length + slots), jnp.int32), jnp.zeros((b, length + slots), jnp.int32),
        self._latents(jnp.zeros((b, *self.model.latent_shape))), jnp.zeros((b, self.model.max_images), jnp.int32)))
    cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), cache_shapes["cache"])
    zeros = jnp.zeros((b, *self.model.latent_shape))
    _, cache = self._run(self.params, cache, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments),
                         jnp.zeros_like(jnp.asarray(tokens)), self._latents(zeros), 0)
    image_tokens = jnp.full((b, slots), s.img, jnp.int32)
    image_positions = jnp.asarray(np.array([len(r) for r in rows])[:, None] + np.arange(slots), jnp.int32)
    ones = jnp.ones((b, slots), jnp.int32)

    def eps_fn(x2, t):
      eps, _ = self._run(self.params, cache, image_tokens, image_positions, ones, ones, self._latents(x2), t)
      return eps

    noise = jax.random.normal(rng, (len(prompts), *self.model.latent_shape), jnp.float32)
    x = diffusion.sample(self.task.schedule, eps_fn, noise, num_steps=num_steps, guidance=guidance,
                         sampler=sampler, rng=jax.random.fold_in(rng, 1))
    return np.asarray(self.task.decode_latents(x, image_channels))
