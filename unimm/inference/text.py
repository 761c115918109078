"""Text generation with a KV cache: prefill the prompts once, then one token at a time.

Prompts (`unimm.inference.prompts`) may hold images, read clean. They are
left-padded into one batch and each row keeps its own positions. Sampling:
greedy (temperature 0), temperature, top-k, top-p. A row stops at EOS or after
its token budget; the loop ends when every row has.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from unimm.inference import prompts as prompts_lib


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0  # 0: no top-k cut
  top_p: float = 1.0  # 1: no nucleus cut


def sample_tokens(logits, rng, opts: SamplingOptions):
  """Next token ids [B] from logits [B, V]."""
  logits = logits.astype(jnp.float32)
  if opts.temperature <= 0:
    return jnp.argmax(logits, axis=-1)
  logits = logits / opts.temperature
  if opts.top_k:
    kth = jax.lax.top_k(logits, opts.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if opts.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    sorted_logits = jnp.where(before >= opts.top_p, -jnp.inf, sorted_logits)
    logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
  return jax.random.categorical(rng, logits, axis=-1)


def empty_cache(model, batch: int, length: int):
  """Zeros shaped like `model`'s KV cache (decode mode) for `batch` rows of `length` slots."""
  ids = jnp.zeros((batch, length), jnp.int32)
  latents = jnp.zeros((batch, model.max_images, *model.latent_shape), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids, ids, ids, latents,
                                             jnp.zeros((batch, model.max_images), jnp.int32)))["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


class TextGenerator:
  """Continues prompts for a Transfusion-style task (KV-cached)."""

  def __init__(self, task, params, specials):
    self.task = task
    self.model = dataclasses.replace(task.model, decode=True)
    self.params = params
    self.specials = specials
    m = self.model.max_images

    def step(params, cache, tokens, positions, segments, image_ids, latents):
      t = jnp.zeros((tokens.shape[0], m), jnp.int32)  # images in a prompt are read clean
      (logits, _), mutated = self.model.apply({"params": params, "cache": cache}, tokens, positions, segments,
                                              image_ids, latents, t, mutable=["cache"])
      return logits[:, -1], mutated["cache"]
    self._step = jax.jit(step, donate_argnums=1)  # the cache is updated in place

  def generate(self, prompts: list[prompts_lib.Prompt], *, max_new_tokens: int | list[int], rng=None,
               options: SamplingOptions = SamplingOptions()) -> list[list[int]]:
    """The generated ids of each prompt (EOS included when reached)."""
    b = len(prompts)
    budget = np.broadcast_to(np.asarray(max_new_tokens), (b,)).copy()
    rows = prompts_lib.batch(prompts, pad_id=self.specials.pad, max_images=self.model.max_images,
                             image_shape=self.task.image_shape)
    cache = empty_cache(self.model, b, rows["tokens"].shape[1] + int(budget.max()))
    latents = self.task.encode_images(jnp.asarray(rows["images"]))
    logits, cache = self._step(self.params, cache, *(jnp.asarray(rows[k]) for k in
                                                     ("tokens", "positions", "segment_ids", "image_ids")), latents)
    no_images = jnp.zeros_like(latents)
    rng = jax.random.key(0) if rng is None else rng
    next_pos = np.array([len(p) for p in prompts], np.int32)
    done = budget <= 0
    out: list[list[int]] = [[] for _ in range(b)]
    for _ in range(int(budget.max())):
      rng, sub = jax.random.split(rng)
      new = np.asarray(sample_tokens(logits, sub, options))
      for i in np.nonzero(~done)[0]:
        out[i].append(int(new[i]))
      done |= (new == self.specials.eos) | (np.array([len(o) for o in out]) >= budget)
      if done.all():
        break
      tokens = np.where(done, self.specials.pad, new)[:, None].astype(np.int32)
      seg = np.where(done, 0, 1).astype(np.int32)[:, None]
      logits, cache = self._step(self.params, cache, jnp.asarray(tokens), jnp.asarray(next_pos[:, None]),
                                 jnp.asarray(seg), jnp.zeros((b, 1), jnp.int32), no_images)
      next_pos += 1
    return out
