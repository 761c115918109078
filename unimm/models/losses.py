"""The cross-entropies every family's next-token losses are made of, as weighted sums over positions.

Sums, not means: the trainer divides by counts over the whole (accumulated, data-parallel) batch
(`unimm.families.Task`). Logits are float32 (the LM heads' output), so is the softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unimm.models import axes, layers


def cross_entropy(logits, targets, weights, z_loss: float = 0.0):
  """Weighted sums over positions: (Σ w·CE, Σ w·z-term) with z = log Z (float32)."""
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  ce = log_z - target_logit
  return jnp.sum(ce * weights), jnp.sum(z_loss * jnp.square(log_z) * weights)


def chunked_cross_entropy(hidden, kernel, targets, weights, *, chunk: int, z_loss: float = 0.0,
                          dtype=jnp.float32):
  """`cross_entropy(hidden @ kernel, …)` without ever holding the [B, T, V] logits.

  hidden [B, T, D], kernel [D, V] (the LM head), targets/weights [B, T]. A scan
  over T in chunks of `chunk` positions; each chunk's logits are recomputed in
  the backward pass (jax.checkpoint), so the memory is B·chunk·V instead of
  B·T·V (float32 logits and their gradient: 4 GiB each at 8×4096 rows and a 32k
  vocabulary) for one more LM-head matmul. Same numerics as the model's head:
  a `dtype` matmul with float32 output, float32 softmax.
  """
  b, t, d = hidden.shape
  if t % chunk:
    raise ValueError(f"model.lm_loss_chunk={chunk} does not divide the row length {t}")
  to_chunks = lambda x: jnp.swapaxes(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 0, 1)

  @jax.checkpoint
  def one_chunk(sums, xs):
    h, y, w = xs
    logits = jax.lax.dot_general(h.astype(dtype), kernel.astype(dtype), (((2,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
    logits = layers.constrain(logits, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_VOCAB))
    ce, z = cross_entropy(logits, y, w, z_loss)
    return (sums[0] + ce, sums[1] + z), None

  zero = jnp.zeros((), jnp.float32)
  (ce, z), _ = jax.lax.scan(one_chunk, (zero, zero), (to_chunks(hidden), to_chunks(targets), to_chunks(weights)))
  return ce, z
