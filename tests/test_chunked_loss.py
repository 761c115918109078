"""The chunked LM loss (no [B, T, V] logits) equals the plain one, values and gradients."""

import sys
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import load_config
from unimm import families
from unimm.models import transfusion

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from train_step import synthetic_batch  # pylint: disable=wrong-import-position


def task_and_batch(chunk: int):
  config = load_config("configs/transfusion/tiny.py")
  config.model.update(lm_loss_chunk=chunk, z_loss=1e-3)
  config.model.backbone.update(num_layers=1, dim=64, mlp_hidden=128)
  task = families.transfusion_task(config, vocab_size=128)
  rows = synthetic_batch(np.random.default_rng(0), 2, 96, task.model.slots, task.model.max_images,
                         task.image_shape, 128)
  return task, {k: jax.numpy.asarray(v) for k, v in rows.items()}


def test_chunked_lm_loss_matches_full_logits():
  plain, batch = task_and_batch(0)
  chunked, _ = task_and_batch(32)
  params = nn.unbox(plain.init(jax.random.key(0), batch))
  rng = jax.random.key(1)

  def terms_and_grads(task):
    def loss(p):
      terms = task.loss_terms(p, batch, rng)
      return terms["lm"] + terms["z"], terms
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (want_total, want), want_grads = terms_and_grads(plain)
  (got_total, got), got_grads = terms_and_grads(chunked)
  assert float(want["lm"]) > 0 and float(want["z"]) > 0
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5)
  np.testing.assert_allclose(got_total, want_total, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 + 1e-4 * np.abs(b).max()),
               got_grads, want_grads)


def test_chunk_must_divide_the_row():
  task, batch = task_and_batch(40)
  params = nn.unbox(task.init(jax.random.key(0), batch))
  with pytest.raises(ValueError, match="lm_loss_chunk=40 does not divide the row length 96"):
    task.loss_terms(params, batch, jax.random.key(1))
