"""The backbone obeys the attention rule: checked through the whole Transfusion model."""

import contextlib
import dataclasses
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm import diffusion
from unimm.data import packed
from unimm.models import attention, autoencoders, backbone, transfusion
from test_attention_mask import random_row

SLOTS = 4  # an 8×8×1 latent in 4×4 patches


def tiny_model(bidirectional_images=True, patch_kind="linear"):
  cfg = backbone.BackboneConfig(num_layers=2, dim=32, num_heads=4, dtype="float32", remat="none",
                                bidirectional_images=bidirectional_images, attention="xla")
  return transfusion.TransfusionModel(vocab_size=50, backbone=cfg, latent_shape=(8, 8, 1), max_images=2,
                                      patch_kind=patch_kind, patch_size=4, unet_channels=(8, 16, 16))


def packed_example():
  """Row of 24: doc 1 = 3 text, BOI, image 1 (4 slots), EOI, 3 text; doc 2 = 6 text; padding."""
  T = 24
  seg = np.zeros(T, np.int32)
  seg[:13] = 1
  seg[13:19] = 2
  img = np.zeros(T, np.int32)
  img[4:8] = 1
  pos = np.zeros(T, np.int32)
  pos[:13] = np.arange(13)
  pos[13:19] = np.arange(6)
  tokens = np.random.default_rng(0).integers(5, 50, T).astype(np.int32)
  return tuple(jnp.asarray(x)[None] for x in (tokens, pos, seg, img))


def run(model, params, tokens, pos, seg, img, latents):
  return jax.jit(model.apply)({"params": params}, packed.Rows(tokens, pos, seg, img), latents, jnp.array([[300, 0]]))


@pytest.fixture(scope="module")
def setup():
  model = tiny_model()
  tokens, pos, seg, img = packed_example()
  latents = jax.random.normal(jax.random.key(1), (1, 2, 8, 8, 1))
  params = jax.jit(model.init)(jax.random.key(0), packed.Rows(tokens, pos, seg, img), latents,
                               jnp.zeros((1, 2), jnp.int32))["params"]
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)  # no zero layers
  return model, params, (tokens, pos, seg, img), latents


def test_future_text_and_other_documents_change_nothing_before(setup):
  model, params, (tokens, pos, seg, img), latents = setup
  base_logits, base_eps = run(model, params, tokens, pos, seg, img, latents)
  changed = tokens.at[0, 10].set((tokens[0, 10] + 7) % 50)  # a text token after the image
  logits, eps = run(model, params, changed, pos, seg, img, latents)
  np.testing.assert_allclose(logits[0, :10], base_logits[0, :10], atol=1e-5)
  np.testing.assert_allclose(eps, base_eps, atol=1e-5)  # the image comes before it
  assert np.abs(logits[0, 10:13] - base_logits[0, 10:13]).max() > 1e-3
  other_doc = tokens.at[0, 15].set((tokens[0, 15] + 3) % 50)
  logits, _ = run(model, params, other_doc, pos, seg, img, latents)
  np.testing.assert_allclose(logits[0, :13], base_logits[0, :13], atol=1e-5)
  np.testing.assert_allclose(logits[0, 13:15], base_logits[0, 13:15], atol=1e-5)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_later_patch_reaches_earlier_patch_only_when_bidirectional(setup, bidirectional):
  _, params, (tokens, pos, seg, img), latents = setup
  model = tiny_model(bidirectional)
  base_logits, base_eps = run(model, params, tokens, pos, seg, img, latents)
  changed = latents.at[0, 0, 4:, 4:].add(1.0)  # the last (bottom-right) 4×4 patch of image 1
  logits, eps = run(model, params, tokens, pos, seg, img, changed)
  first_patch = np.abs(eps[0, 0, :4, :4] - base_eps[0, 0, :4, :4]).max()
  before_image = np.abs(logits[0, :4] - base_logits[0, :4]).max()
  assert before_image < 1e-5  # text before the image never sees it
  if bidirectional:
    assert first_patch > 1e-4
  else:
    assert first_patch < 1e-6


def test_attend_matches_reference_on_random_packs():
  rng = np.random.default_rng(0)
  for _ in range(5):
    rows = [random_row(rng, 40) for _ in range(2)]
    seg = jnp.asarray(np.stack([r[0] for r in rows]))
    img = jnp.asarray(np.stack([r[1] for r in rows]))
    q = jnp.asarray(rng.normal(size=(2, 40, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 40, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 40, 2, 8)), jnp.float32)
    got = attention.attend(q, k, v, seg, img, implementation="xla")
    want = attention.reference_attention(q, k, v, seg, img)
    real = np.asarray(seg) > 0  # padding rows are excluded from losses
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)


def test_patch_layers_and_vae_shapes():
  lat = jax.random.normal(jax.random.key(0), (2, 3, 8, 8, 4))
  np.testing.assert_array_equal(
      transfusion.patches.unpatchify(transfusion.patches.patchify(lat.reshape(6, 8, 8, 4), 2), 2, 8, 8, 4),
      lat.reshape(6, 8, 8, 4))
  for kind in ("linear", "unet"):  # shapes only: traced, never compiled
    model = tiny_model(patch_kind=kind)
    tokens, pos, seg, img = packed_example()
    latents = jnp.zeros((1, 2, 8, 8, 1))
    t = jnp.zeros((1, 2), jnp.int32)
    rows = packed.Rows(tokens, pos, seg, img)
    logits, eps = jax.eval_shape(lambda m=model, r=rows: m.apply(m.init(jax.random.key(0), r, latents, t), r,
                                                                  latents, t))
    assert logits.shape == (1, 24, 50) and eps.shape == (1, 2, 8, 8, 1)
  cfg = autoencoders.AutoencoderConfig(kind="kl_vae", downsample=4, latent_channels=8, channels=16,
                                       channel_mults=(1, 2, 2))
  vae = autoencoders.KLVAE(cfg, 3)
  images = jnp.zeros((2, 32, 32, 3), jnp.uint8)

  def encode_decode():
    params = vae.init(jax.random.key(0), images, jax.random.key(1))
    z = vae.apply(params, images, method=vae.encode)
    return z, vae.apply(params, z, method=vae.decode)
  z, decoded = jax.eval_shape(encode_decode)
  assert z.shape == (2, 8, 8, 8) and cfg.latent_shape((32, 32, 3)) == (8, 8, 8)
  assert decoded.shape == (2, 32, 32, 3)


def test_schedule_used_by_the_task():
  assert diffusion.Schedule.cosine(1000).num_timesteps == 1000


def test_remat_policies_change_what_is_saved_not_the_gradients():
  """Remat policies give the gradients of keeping everything; the named policies keep only the
  projections they name (fewer residuals than keeping every matmul output, more than keeping none)."""
  _, pos, seg, img = packed_example()
  x = jax.random.normal(jax.random.key(3), (1, 24, 32))

  def loss_fn(policy):
    cfg = backbone.BackboneConfig(num_layers=2, dim=32, num_heads=4, dtype="float32", remat=policy, scan=True,
                                  attention="xla")
    model = backbone.Backbone(cfg)
    return lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, x, pos, seg, img))), model

  def saved(policy):  # elements the backward pass keeps (traced, not run)
    loss, _ = loss_fn(policy)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      jax.ad_checkpoint.print_saved_residuals(loss, params)  # one line per residual: "f32[1,24,32] from …"
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
             for dims in re.findall(r"^\w+\[([\d,]*)\]", printed.getvalue(), re.M)]
    assert sizes, printed.getvalue()
    return sum(sizes)

  _, model = loss_fn("none")
  params = model.init(jax.random.key(0), x, pos, seg, img)["params"]
  reference = jax.jit(jax.grad(loss_fn("none")[0]))(params)
  for policy in ("qkv_proj", "full"):
    grads = jax.jit(jax.grad(loss_fn(policy)[0]))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, reference)
  sizes = {policy: saved(policy) for policy in sorted(backbone.REMAT_POLICIES)}
  assert sizes["full"] < sizes["qkv_proj"] < sizes["qkv_out_proj"] < sizes["dots_no_batch"] < sizes["none"], sizes


def test_sincos_2d_matches_a_loop_over_rows_and_columns():
  grid_h, grid_w, dim = 3, 5, 16
  q = dim // 4
  want = np.zeros((grid_h * grid_w, dim))
  for r in range(grid_h):
    for c in range(grid_w):
      for i in range(q):
        w = 10000.0 ** (-i / q)
        want[r * grid_w + c, [i, q + i, 2 * q + i, 3 * q + i]] = (np.sin(r * w), np.cos(r * w), np.sin(c * w),
                                                                  np.cos(c * w))
  np.testing.assert_allclose(transfusion.patches.sincos_2d(grid_h, grid_w, dim), want, atol=1e-6)
  with pytest.raises(ValueError, match="multiple of 4"):
    transfusion.patches.sincos_2d(2, 2, 6)


def test_linear_patch_position_adds_the_embedding_and_no_parameters():
  latents = jax.random.normal(jax.random.key(0), (2, 3, 8, 8, 1))
  t_emb = jax.random.normal(jax.random.key(1), (2, 3, 32))
  plain = transfusion.patches.LinearPatch(4, 32, (8, 8, 1))
  placed = transfusion.patches.LinearPatch(4, 32, (8, 8, 1), position="sincos")
  params = plain.init(jax.random.key(2), latents, t_emb, method=plain.encode)
  assert jax.tree.structure(placed.init(jax.random.key(2), latents, t_emb, method=placed.encode)) == \
      jax.tree.structure(params)
  without, _ = plain.apply(params, latents, t_emb, method=plain.encode)
  with_pos, _ = placed.apply(params, latents, t_emb, method=placed.encode)
  np.testing.assert_allclose(with_pos - without, np.broadcast_to(transfusion.patches.sincos_2d(2, 2, 32), without.shape),
                             atol=1e-5)
  with pytest.raises(ValueError, match="patch_position='learned'"):
    transfusion.patches.LinearPatch(4, 32, (8, 8, 1), position="learned").init(jax.random.key(2), latents, t_emb,
                                                                                method=plain.encode)
  unet = dataclasses.replace(tiny_model(patch_kind="unet"), patch_position="sincos")
  tokens, pos, seg, img = packed_example()
  with pytest.raises(ValueError, match="patch_position='sincos' is for linear patches"):
    unet.init(jax.random.key(0), packed.Rows(tokens, pos, seg, img), jnp.zeros((1, 2, 8, 8, 1)),
              jnp.zeros((1, 2), jnp.int32))
