"""The VQ layer against float64 NumPy: cosine lookup, losses, straight-through gradients, usage."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm.models import quantizer


def normalize64(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("l2", [True, False])
def test_lookup_and_losses_match_numpy(l2):
  vq = quantizer.VectorQuantizer(codebook_size=32, code_dim=8, l2_normalized=l2, beta=0.25)
  z = jax.random.normal(jax.random.key(0), (4, 6, 6, 8))
  params = nn.meta.unbox(vq.init(jax.random.key(1), z)["params"])
  z_q, aux = vq.apply({"params": params}, z)
  codebook = np.asarray(params["codebook"], np.float64)
  x = np.asarray(z, np.float64)
  if l2:
    x, codebook = normalize64(x), normalize64(codebook)
  # Brute force: every input against every code.
  want = np.array([[np.argmin([np.sum((v - c) ** 2) for c in codebook]) for v in row]
                   for row in x.reshape(-1, 36, 8)]).reshape(4, 6, 6)
  np.testing.assert_array_equal(np.asarray(aux["indices"]), want)
  q = codebook[want]
  np.testing.assert_allclose(np.asarray(z_q), q, atol=1e-5)
  mse = np.mean(np.sum((x - q) ** 2, -1))
  np.testing.assert_allclose(float(aux["codebook_loss"]), mse, rtol=1e-4)
  np.testing.assert_allclose(float(aux["commitment_loss"]), 0.25 * mse, rtol=1e-4)
  counts = np.bincount(want.reshape(-1), minlength=32)
  p = counts / counts.sum()
  assert float(aux["codebook_usage"]) == pytest.approx((counts > 0).mean())
  assert float(aux["codebook_perplexity"]) == pytest.approx(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))), rel=1e-5)
  np.testing.assert_allclose(np.asarray(vq.apply({"params": params}, aux["indices"], method=vq.lookup)), q,
                             atol=1e-5)


def test_straight_through_and_loss_gradients():
  vq = quantizer.VectorQuantizer(codebook_size=16, code_dim=8)
  z = jax.random.normal(jax.random.key(2), (10, 8))
  w = jax.random.normal(jax.random.key(3), (10, 8))
  params = nn.meta.unbox(vq.init(jax.random.key(4), z)["params"])
  # The quantised output passes gradients to z as if it were (normalised) z itself.
  got = jax.grad(lambda z: jnp.sum(vq.apply({"params": params}, z)[0] * w))(z)
  want = jax.grad(lambda z: jnp.sum(quantizer.l2_normalize(z) * w))(z)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
  # The codebook loss moves only the codebook, the commitment loss only the encoder side.
  def loss(params, z, name):
    return vq.apply({"params": params}, z)[1][name]
  assert float(jnp.abs(jax.grad(loss, argnums=1)(params, z, "codebook_loss")).max()) == 0.0
  assert float(jnp.abs(jax.tree.leaves(jax.grad(loss)(params, z, "commitment_loss"))[0]).max()) == 0.0
  assert float(jnp.abs(jax.tree.leaves(jax.grad(loss)(params, z, "codebook_loss"))[0]).max()) > 0.0


def test_entropy_loss_matches_numpy():
  d = np.random.default_rng(0).uniform(0, 4, size=(12, 5))
  t = 0.5
  logits = -d / t
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  per_input = -np.mean(np.sum(p * np.log(p), -1))
  avg = p.mean(0)
  want = per_input + np.sum(avg * np.log(avg))
  assert float(quantizer.entropy_loss(jnp.asarray(d, jnp.float32), t)) == pytest.approx(want, abs=1e-5)
  # Confident, evenly spread assignments score lower than uniform ones.
  confident = np.full((10, 10), 4.0) - 4.0 * np.eye(10)
  assert float(quantizer.entropy_loss(jnp.asarray(confident), 0.1)) < float(
      quantizer.entropy_loss(jnp.zeros((10, 10)), 0.1))
