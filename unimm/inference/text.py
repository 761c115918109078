"""Text generation with a KV cache: prefill the prompts once, then one token at a time.

Prompts of different lengths are left-padded into one batch (padding has
segment id 0, so the attention rule already ignores it) and each row keeps its
own positions. Sampling: greedy (temperature 0), temperature, top-k, top-p.
A row stops at EOS or after `max_new_tokens`; the loop ends when all rows have.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


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


def left_pad(prompts: list[list[int]], pad_id: int, multiple: int = 16):
  """tokens, positions, segment_ids [B, P] with P rounded up to `multiple` (fewer compiled shapes)."""
  longest = max(len(p) for p in prompts)
  length = -(-longest // multiple) * multiple
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  positions = np.zeros_like(tokens)
  segments = np.zeros_like(tokens)
  for i, p in enumerate(prompts):
    tokens[i, length - len(p):] = p
    positions[i, length - len(p):] = np.arange(len(p))
    segments[i, length - len(p):] = 1
  return tokens, positions, segments


class TextGenerator:
  """Greedy/sampled continuation of token prompts for a Transfusion-style model (KV-cached)."""

  def __init__(self, model, params, *, eos_id: int, pad_id: int):
    self.model = dataclasses.replace(model, decode=True)
    self.params = params
    self.eos_id, self.pad_id = eos_id, pad_id

    def step(params, cache, tokens, positions, segments):
      (logits, _), mutated = self.model.apply({"params": params, "cache": cache},
                                              *self._inputs(tokens, positions, segments), mutable=["cache"])
      return logits[:, -1], mutated["cache"]
    self._jitted_step = jax.jit(step, donate_argnums=1)  # the cache is updated in place

  def _inputs(self, tokens, positions, segments):
    b = tokens.shape[0]
    m = self.model.max_images
    latents = jnp.zeros((b, m, *self.model.latent_shape), jnp.float32)
    return tokens, positions, segments, jnp.zeros_like(tokens), latents, jnp.zeros((b, m), jnp.int32)

  def empty_cache(self, batch: int, length: int):
    shapes = jax.eval_shape(lambda: self.model.init(
        jax.random.key(0), *self._inputs(*(jnp.zeros((batch, length), jnp.int32),) * 3)))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def _step(self, cache, tokens, positions, segments):
    return self._jitted_step(self.params, cache, tokens, positions, segments)

  def generate(self, prompts: list[list[int]], *, max_new_tokens: int, rng=None,
               options: SamplingOptions = SamplingOptions()) -> list[list[int]]:
    """The generated ids of each prompt (EOS included when reached)."""
    tokens, positions, segments = left_pad(prompts, self.pad_id)
    b = len(prompts)
    cache = self.empty_cache(b, tokens.shape[1] + max_new_tokens)
    logits, cache = self._step(cache, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments))
    rng = jax.random.key(0) if rng is None else rng
    next_pos = np.array([len(p) for p in prompts], np.int32)
    done = np.zeros(b, bool)
    out: list[list[int]] = [[] for _ in range(b)]
    for _ in range(max_new_tokens):
      rng, sub = jax.random.split(rng)
      new = np.asarray(sample_tokens(logits, sub, options))
      for i in np.nonzero(~done)[0]:
        out[i].append(int(new[i]))
      done |= new == self.eos_id
      if done.all():
        break
      seg = np.where(done, 0, 1).astype(np.int32)[:, None]
      logits, cache = self._step(cache, jnp.asarray(np.where(done, self.pad_id, new)[:, None].astype(np.int32)),
                                 jnp.asarray(next_pos[:, None]), jnp.asarray(seg))
      next_pos += 1
    return out
