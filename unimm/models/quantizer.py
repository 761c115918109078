"""Vector quantisation for discrete image tokens (the VQ tokenizer of Chameleon- and Janus-style families).

LlamaGen's recipe (which Janus uses): a low-dimensional code space (8), codes
and inputs L2-normalised so the lookup is by cosine similarity, the
straight-through estimator, codebook loss ‖sg(z) − q‖² plus commitment
β·‖z − sg(q)‖² (β = 0.25), and an optional entropy term that makes each
input's code assignment confident while spreading the batch over the codebook.
Usage statistics (fraction of codes used, perplexity of the assignment) come
with every call.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm.models import axes, layers


def l2_normalize(x, eps: float = 1e-6):
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))


def nearest_codes(z, codebook):
  """Indices [...] of the codes nearest to z [..., d] in squared Euclidean distance."""
  distances = (jnp.sum(jnp.square(z), -1, keepdims=True) - 2 * z @ codebook.T
               + jnp.sum(jnp.square(codebook), -1))
  return jnp.argmin(distances, axis=-1), distances


def code_counts(indices, codebook_size: int, weights=None):
  """How often each code is chosen (weighted): [codebook_size]."""
  w = jnp.ones(indices.shape, jnp.float32) if weights is None else jnp.broadcast_to(weights, indices.shape)
  return jnp.zeros((codebook_size,), jnp.float32).at[indices.reshape(-1)].add(w.reshape(-1).astype(jnp.float32))


def usage_from_counts(counts) -> dict:
  """Fraction of the codebook used and the perplexity of the code distribution."""
  p = counts / jnp.maximum(jnp.sum(counts), 1e-9)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return {"codebook_usage": jnp.mean(counts > 0), "codebook_perplexity": jnp.exp(entropy)}


def usage(indices, codebook_size: int, weights=None) -> dict:
  """Fraction of the codebook used by `indices` and the perplexity of their distribution."""
  return usage_from_counts(code_counts(indices, codebook_size, weights))


def _weighted_mean(x, weights):
  if weights is None:
    return jnp.mean(x)
  w = jnp.broadcast_to(weights, x.shape).astype(jnp.float32)
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1e-9)


def entropy_loss(distances, temperature: float, weights=None):
  """Mean per-input entropy minus the entropy of the batch-average assignment (soft, by distance)."""
  logits = -distances.reshape(-1, distances.shape[-1]) / temperature
  w = jnp.ones(logits.shape[:1]) if weights is None else jnp.broadcast_to(weights, distances.shape[:-1]).reshape(-1)
  w = w.astype(jnp.float32) / jnp.maximum(jnp.sum(w), 1e-9)
  probs = jax.nn.softmax(logits, axis=-1)
  per_input = -jnp.sum(w * jnp.sum(probs * jax.nn.log_softmax(logits, axis=-1), axis=-1))
  avg = jnp.sum(w[:, None] * probs, axis=0)
  batch = -jnp.sum(avg * jnp.log(avg + 1e-10))
  return per_input - batch


class VectorQuantizer(nn.Module):
  codebook_size: int
  code_dim: int = 8
  l2_normalized: bool = True  # cosine lookup (LlamaGen); False: plain Euclidean VQ-VAE
  beta: float = 0.25  # commitment weight
  entropy_temperature: float = 0.01

  @nn.compact
  def __call__(self, z, weights=None):
    """z [..., code_dim] → (z_q with straight-through gradients, aux: indices, losses, usage).

    `weights` (broadcast to z.shape[:-1], e.g. 0 for padding images) weight the means.
    """
    if z.shape[-1] != self.code_dim:
      raise ValueError(f"VectorQuantizer takes inputs of {self.code_dim} channels, got {z.shape}")
    init = nn.with_logical_partitioning(layers.init_normal(1.0), (axes.CODES, axes.CODE_DIM))
    codebook = self.param("codebook", init, (self.codebook_size, self.code_dim), jnp.float32)
    z = z.astype(jnp.float32)
    if self.l2_normalized:
      z, codebook = l2_normalize(z), l2_normalize(codebook)
    indices, distances = nearest_codes(z, codebook)
    q = jnp.take(codebook, indices, axis=0)
    aux = {
        "indices": indices,
        "codebook_loss": _weighted_mean(jnp.sum(jnp.square(jax.lax.stop_gradient(z) - q), -1), weights),
        "commitment_loss": self.beta * _weighted_mean(jnp.sum(jnp.square(z - jax.lax.stop_gradient(q)), -1),
                                                      weights),
        "entropy_loss": entropy_loss(distances, self.entropy_temperature, weights),
        "code_counts": code_counts(indices, self.codebook_size, weights),
    }
    aux.update(usage_from_counts(aux["code_counts"]))
    return z + jax.lax.stop_gradient(q - z), aux

  def lookup(self, indices):
    """Code vectors for indices [...] → [..., code_dim] (normalised if the lookup is by cosine)."""
    codebook = nn.meta.unbox(self.get_variable("params", "codebook"))
    codebook = l2_normalize(codebook) if self.l2_normalized else codebook
    return jnp.take(codebook, indices, axis=0)
