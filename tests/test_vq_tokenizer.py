"""The VQ tokenizer: encoder gradients through the quantiser, dead-code restarts, the GAN and perceptual
terms against their definitions, and a trained tiny tokenizer's reconstructions."""

import functools
import json
import os
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm.models import perceptual, vq


IMAGE = (8, 8, 3)


@functools.lru_cache(maxsize=None)
def tiny_task(**loss):
  """(task, params, batch); cached: callers must not modify them in place."""
  cfg = vq.VQConfig(channels=8, channel_mults=(1, 2), blocks_per_level=1, attention=False, z_channels=8,
                    codebook_size=32, code_dim=4)
  task = vq.TokenizerTask(vq.VQModel(cfg, 3), vq.TokenizerLoss(**loss))
  batch = {"images": jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 2, *IMAGE)).astype(np.uint8)),
           "image_valid": jnp.asarray([[True, True], [True, False], [False, False]])}
  params = nn.meta.unbox(jax.jit(task.init)(jax.random.key(0), batch))
  return task, params, batch


def total_loss(task, params, batch, step=0):
  return task.combine(task.loss_terms(params, batch, jax.random.key(1), step), task.loss_counts(batch))[0]


def test_straight_through_gradients_reach_the_encoder_and_padding_is_ignored():
  task, params, batch = tiny_task()

  @jax.jit
  def check(params, batch, other):
    grads = jax.grad(lambda p: total_loss(task, p, batch))(params)
    # The reconstruction alone reaches the encoder only through the straight-through estimator.
    rec = jax.grad(lambda p: task.loss_terms(p, batch, jax.random.key(1))["reconstruction"])(params)
    return grads, rec, total_loss(task, params, batch), total_loss(task, params, other)

  # Invalid images contribute nothing: changing them leaves the loss unchanged.
  other = dict(batch, images=batch["images"].at[2].set(0).at[1, 1].set(255))
  grads, rec, loss, loss_other = check(params, batch, other)
  assert float(jnp.abs(grads["vq"]["encoder"]["stem"]["kernel"]).max()) > 0
  assert float(jnp.abs(grads["vq"]["quant_proj"]["kernel"]).max()) > 0
  assert float(jnp.abs(rec["vq"]["encoder"]["stem"]["kernel"]).max()) > 0
  assert float(jnp.abs(rec["vq"]["quantizer"]["codebook"]).max()) == 0  # codes move by the codebook loss only
  assert float(loss_other) == pytest.approx(float(loss), rel=1e-6)


def test_dead_codes_restart_from_encoder_outputs():
  task, params, batch = tiny_task(reinit_dead_codes_every=10)
  codebook = params["vq"]["quantizer"]["codebook"]
  # Collapse the codebook onto two directions: at most two codes are used, the rest are dead.
  ones = jnp.ones_like(codebook[0])
  codebook = codebook.at[1:].set(jnp.broadcast_to(-ones, codebook[1:].shape)).at[0].set(ones)
  params = {**params, "vq": {**params["vq"], "quantizer": {"codebook": codebook}}}
  feats = np.asarray(task.vq.apply({"params": params["vq"]}, batch["images"].reshape(-1, *IMAGE),
                                   method=vq.VQModel.features)).reshape(-1, 4)
  _, aux = task.vq.apply({"params": params["vq"]}, batch["images"].reshape(-1, *IMAGE), method=vq.VQModel.quantize)
  dead = np.asarray(aux["code_counts"]) == 0
  assert dead.sum() >= 1
  unchanged = task.after_update(params, batch, jax.random.key(2), jnp.int32(3))  # (3 + 1) % 10 != 0
  np.testing.assert_array_equal(np.asarray(unchanged["vq"]["quantizer"]["codebook"]), np.asarray(codebook))
  new = np.asarray(task.after_update(params, batch, jax.random.key(2), jnp.int32(9))["vq"]["quantizer"]["codebook"])
  np.testing.assert_array_equal(new[~dead], np.asarray(codebook)[~dead])
  valid_feats = feats.reshape(3, 2, -1, 4)[np.asarray(batch["image_valid"])].reshape(-1, 4)
  for row in new[dead]:  # each restarted code is one of the valid images' encoder outputs
    assert np.min(np.abs(valid_feats - row).max(-1)) < 1e-5


def test_gan_terms_train_each_side_with_its_own_loss():
  task, params, batch = tiny_task(gan_weight=0.5, gan_start=5)
  assert "discriminator" in params

  def terms(p, step):
    return task.loss_terms(p, batch, jax.random.key(1), step)

  @jax.jit
  def check(params):
    grads = jax.grad(lambda p: total_loss(task, p, batch, 5))(params)
    # gan_weight · the hinge mean over the 3 valid images
    want = jax.grad(lambda p: 0.5 * terms(p, 5)["discriminator"] / 3.0)(params)
    gen = jax.grad(lambda p: terms(p, 5)["generator_adversarial"])(params)
    return terms(params, 4), terms(params, 5), grads, want, gen

  before, sums, grads, want, gen = check(params)
  assert float(before["discriminator"]) == 0.0 and float(before["generator_adversarial"]) == 0.0
  assert float(sums["discriminator"]) > 0.0
  for g, w in zip(jax.tree.leaves(grads["discriminator"]), jax.tree.leaves(want["discriminator"])):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-7)
  # The adversarial term moves the decoder, never the discriminator.
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(gen["discriminator"]))
  assert float(jnp.abs(gen["vq"]["decoder"]["out"]["kernel"]).max()) > 0.0


def conv64(x, kernel, bias):
  """'SAME' 3×3 convolution in float64 loops over kernel taps (NHWC, HWIO)."""
  n, h, w, _ = x.shape
  pad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((n, h, w, kernel.shape[-1]))
  for dy in range(3):
    for dx in range(3):
      out += np.einsum("nhwc,co->nhwo", pad[:, dy:dy + h, dx:dx + w], kernel[dy, dx])
  return out + bias


def lpips64(arrays, x, y):
  def feats(x):
    x = np.repeat(x, 3, -1) if x.shape[-1] == 1 else x
    x = (x - perceptual.SHIFT.astype(np.float64)) / perceptual.SCALE.astype(np.float64)
    out = []
    for b in range(2):
      if b:
        n, h, w, c = x.shape
        x = x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
      for i in range(2):
        x = np.maximum(conv64(x, arrays[f"conv{b}_{i}_kernel"], arrays[f"conv{b}_{i}_bias"]), 0)
      out.append(x)
    return out
  total = 0
  for b, (fx, fy) in enumerate(zip(feats(x), feats(y))):
    nx = fx / (np.sqrt(np.sum(fx ** 2, -1, keepdims=True)) + 1e-10)
    ny = fy / (np.sqrt(np.sum(fy ** 2, -1, keepdims=True)) + 1e-10)
    total = total + np.mean(np.sum((nx - ny) ** 2 * arrays[f"lin{b}"], -1), axis=(1, 2))
  return total


def test_lpips_matches_numpy(tmp_path):
  rng = np.random.default_rng(0)
  widths = [(3, 4), (4, 4), (4, 6), (6, 6)]
  arrays = {}
  for j, (cin, cout) in enumerate(widths):
    b, i = divmod(j, 2)
    arrays[f"conv{b}_{i}_kernel"] = rng.normal(0, 0.5, (3, 3, cin, cout))
    arrays[f"conv{b}_{i}_bias"] = rng.normal(0, 0.1, cout)
  arrays["lin0"], arrays["lin1"] = rng.uniform(0, 1, 4), rng.uniform(0, 1, 6)
  path = tmp_path / "net.npz"
  np.savez(path, **arrays)
  weights = perceptual.load(str(path))
  x, y = rng.uniform(-1, 1, (2, 8, 8, 3)), rng.uniform(-1, 1, (2, 8, 8, 3))
  got = np.asarray(perceptual.lpips(weights, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
  np.testing.assert_allclose(got, lpips64(arrays, x, y), rtol=2e-4)
  assert float(perceptual.lpips(weights, jnp.asarray(x, jnp.float32), jnp.asarray(x, jnp.float32))[0]) == 0.0
  # Behind its switch in the tokenizer's loss.
  task, params, batch = tiny_task(perceptual_weight=1.0, perceptual_weights=str(path))
  parts = task.combine(task.loss_terms(params, batch, jax.random.key(1)), task.loss_counts(batch))[1]
  assert float(parts["perceptual_loss"]) > 0
  with pytest.raises(ValueError, match="perceptual_weights"):
    tiny_task(perceptual_weight=1.0)


@pytest.mark.slow
@pytest.mark.xdist_group("shapes_vq")  # the worker that trains it for the family CLI tests
def test_trained_tiny_tokenizer_reconstructs_shapes(shapes_vq):
  """The tiny shapes tokenizer (8×8 codes) after 300 steps of batch 4 through the CLI, which ends by evaluating it.
  (Its config's 1500 steps reach 32.5 dB and full detector agreement: README.)"""
  with open(os.path.join(shapes_vq, "eval.json")) as f:
    result = json.load(f)["tokenizer"]["shapes"]
  assert result["codes_per_image"] == 64 and result["examples"] == 100
  assert result["psnr"] > 20.0, result  # 22.4 dB when written
  assert result["codebook_usage"] > 0.5, result  # 0.95 (without dead-code restarts at batch 8: 0.15)
  assert result["detector_agreement"] >= 0.3, result  # 0.48; an untrained tokenizer scores 0
  assert os.path.exists(result["png"])
