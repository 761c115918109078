"""Output heads compute float32 logits from bfloat16 operands (no rounding of the logits to bfloat16).

bf16 has 8 significant bits: logits in [8, 16) would be spaced 0.0625 apart, in [16, 32) 0.125 — the
softmax, the cross-entropy and the z-loss would see quantised values. The reference here is float64
numpy on the same bf16-rounded hidden states and kernels.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from conftest import load_config, random_params
from unimm import families
from unimm.data import packed
from unimm.models import janus, layers, losses

LENGTH = 32


def bf16_config(path: str, arg=None):
  config = load_config(path, arg)
  config.model.backbone.update(num_layers=1, dim=64, num_heads=2, mlp_hidden=128, dtype="bfloat16")
  return config


def rows(vocab: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, vocab, (2, LENGTH)), jnp.int32)
  ones = jnp.ones((2, LENGTH), jnp.int32)
  return packed.Rows(tokens, jnp.broadcast_to(jnp.arange(LENGTH), (2, LENGTH)), ones, jnp.zeros_like(ones))


def scaled_head(params, path: tuple[str, ...], factor: float):
  """params with the kernel at `path` multiplied (logits of tens: where bf16 spacing is 0.125)."""
  params = jax.tree.map(lambda x: x, params)
  node = params
  for key in path[:-1]:
    node = node[key]
  node[path[-1]] = node[path[-1]] * factor
  return params


def decoder_output(model, rows):
  """The final-normed hidden states the model's heads read (text tokens only)."""
  return model.decoder(model.embed(rows.tokens), rows.positions, rows.segment_ids, rows.image_ids)


def reference_logits(hidden, kernel):
  h = np.asarray(jnp.asarray(hidden, jnp.bfloat16).astype(jnp.float32), np.float64)
  k = np.asarray(jnp.asarray(kernel, jnp.bfloat16).astype(jnp.float32), np.float64)
  return h @ k


def assert_float32_logits(logits, want):
  assert logits.dtype == jnp.float32
  logits = np.asarray(logits, np.float64)
  assert np.abs(want).max() > 8  # where rounding to bf16 would move values by up to 0.0625–0.125
  np.testing.assert_allclose(logits, want, atol=2e-3, rtol=0)


def test_transfusion_lm_head_logits_are_float32():
  task = families.transfusion_task(bf16_config("configs/transfusion/tiny.py"), vocab_size=128)
  model = task.model
  inputs = (rows(128), *model.dummy_inputs(2, LENGTH)[1:])
  params = scaled_head(random_params(model, *inputs), ("lm_head", "kernel"), 40.0)
  logits, _ = jax.jit(model.apply)({"params": params}, *inputs)
  hidden, _ = jax.jit(lambda p: model.apply(p, *inputs, return_hidden=True))({"params": params})
  assert_float32_logits(logits, reference_logits(hidden, params["lm_head"]["kernel"]))


def test_chunked_lm_loss_uses_float32_logits():
  rng = np.random.default_rng(1)
  hidden = jnp.asarray(rng.normal(size=(2, LENGTH, 64)), jnp.bfloat16)
  kernel = jnp.asarray(rng.normal(size=(64, 128)) * 2.0, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 128, (2, LENGTH)), jnp.int32)
  weights = jnp.ones((2, LENGTH), jnp.float32)
  ce, z = losses.chunked_cross_entropy(hidden, kernel, targets, weights, chunk=8, z_loss=1e-2,
                                            dtype=jnp.bfloat16)
  logits = reference_logits(hidden, kernel)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  target_logit = np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
  assert np.abs(logits).max() > 16
  np.testing.assert_allclose(float(ce), (log_z - target_logit).sum(), rtol=2e-6)
  np.testing.assert_allclose(float(z), (1e-2 * log_z ** 2).sum(), rtol=2e-6)


def test_chameleon_logits_are_float32():
  config = bf16_config("configs/chameleon/tiny.py")
  task = families.chameleon_task(config, vocab_size=128, frozen_codec=families.random_frozen_codec(config))
  model, inputs = task.model, (rows(128),)
  params = scaled_head(random_params(model, *inputs), ("lm_head", "kernel"), 40.0)
  logits = jax.jit(model.apply)({"params": params}, *inputs)
  hidden = jax.jit(lambda p: model.apply(p, *inputs, method=decoder_output))({"params": params})
  assert_float32_logits(logits, reference_logits(hidden, params["lm_head"]["kernel"]))


def test_janus_text_and_image_heads_are_float32():
  config = bf16_config("configs/janus/tiny.py", "stage2")
  task = families.janus_task(config, vocab_size=128, frozen_codec=families.random_frozen_codec(config))
  model = task.model
  inputs = (rows(128), jnp.zeros((2, model.max_images, *model.image_shape), jnp.uint8))
  params = random_params(model, *inputs)
  params = scaled_head(scaled_head(params, ("lm_head", "kernel"), 40.0), ("gen_head", "fc2", "kernel"), 40.0)
  logits = jax.jit(model.apply)({"params": params}, *inputs)
  hidden = jax.jit(lambda p: model.apply(p, inputs[0], method=decoder_output))({"params": params})
  assert_float32_logits(logits[..., :model.text_vocab], reference_logits(hidden, params["lm_head"]["kernel"]))
  image_logits = np.asarray(logits[..., model.text_vocab:])
  assert np.abs(image_logits).max() > 8
  # Not on the bf16 grid: a bf16 result cast to float32 would be (every value) exactly representable in bf16.
  on_grid = image_logits == np.asarray(jnp.asarray(image_logits, jnp.bfloat16).astype(jnp.float32))
  assert on_grid.mean() < 0.1


def test_dense_layers_take_an_output_dtype():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 64)) * 4, jnp.bfloat16)
  for module in (layers.DenseGeneral((32,), ("embed",), ("vocab",), dtype=jnp.bfloat16, out_dtype=jnp.float32),
                 janus.Adaptor(64, 32, jnp.bfloat16, out_dtype=jnp.float32)):
    params = nn.unbox(module.init(jax.random.key(0), x))
    assert module.apply(params, x).dtype == jnp.float32
