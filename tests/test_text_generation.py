"""KV-cached text generation equals recomputing the whole row each step; sampling filters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimm.inference import text
from unimm.models import backbone, transfusion

EOS, PAD = 2, 0


def tiny():
  cfg = backbone.BackboneConfig(num_layers=2, dim=32, num_heads=4, dtype="float32", remat="none", scan=True,
                                attention="xla")
  model = transfusion.TransfusionModel(vocab_size=40, backbone=cfg, latent_shape=(4, 4, 1), max_images=1,
                                       patch_size=2)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), tokens, tokens, tokens, tokens, jnp.zeros((1, 1, 4, 4, 1)),
                               jnp.zeros((1, 1), jnp.int32))["params"]
  params = nn.meta.unbox(params)
  # Sharpen the LM head so greedy decoding is not a near-tie anywhere.
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 8.0
  return model, params


def uncached_greedy(model, params, prompt, max_new):
  """Reference: run the whole row (one document) again for every new token."""
  apply = jax.jit(model.apply)
  seq = list(prompt)
  out = []
  for _ in range(max_new):
    t = jnp.asarray([seq], jnp.int32)
    n = len(seq)
    logits, _ = apply({"params": params}, t, jnp.arange(n)[None], jnp.ones((1, n), jnp.int32),
                      jnp.zeros((1, n), jnp.int32), jnp.zeros((1, 1, 4, 4, 1)), jnp.zeros((1, 1), jnp.int32))
    tok = int(jnp.argmax(logits[0, -1]))
    out.append(tok)
    if tok == EOS:
      break
    seq.append(tok)
  return out


def test_cached_greedy_equals_uncached_for_batched_prompts_of_different_lengths():
  model, params = tiny()
  prompts = [[1, 5, 9, 11], [1, 7], [1, 3, 4, 8, 12, 30, 31]]
  gen = text.TextGenerator(model, params, eos_id=EOS, pad_id=PAD)
  got = gen.generate(prompts, max_new_tokens=10)
  for prompt, tokens in zip(prompts, got):
    assert tokens == uncached_greedy(model, params, prompt, 10)
    assert len(tokens) == 10 or tokens[-1] == EOS


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 2000)
  def draws(opts):
    return np.array([int(text.sample_tokens(logits, k, opts)[0]) for k in keys[:400]])
  assert set(draws(text.SamplingOptions(temperature=1.0, top_k=2))) == {0, 1}
  assert set(draws(text.SamplingOptions(temperature=1.0, top_p=0.7))) == {0, 1}  # 0.5 + 0.3 covers 0.7
  assert set(draws(text.SamplingOptions(temperature=1.0, top_p=0.5))) == {0}
  assert int(text.sample_tokens(logits, keys[0], text.SamplingOptions())[0]) == 0  # greedy
  full = draws(text.SamplingOptions(temperature=1.0))
  assert abs((full == 0).mean() - 0.5) < 0.1 and (full == 3).any()


def test_left_pad():
  tokens, positions, segments = text.left_pad([[1, 2, 3], [4]], pad_id=0, multiple=4)
  assert tokens.tolist() == [[0, 1, 2, 3], [0, 0, 0, 4]]
  assert positions.tolist() == [[0, 0, 1, 2], [0, 0, 0, 0]] and segments.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]


def test_cached_image_sampler_equals_full_recompute():
  """Running only the image slots against the prompt's cache gives the reference sampler's images."""
  from unimm import diffusion
  from unimm.data.tokenizer import SpecialIds
  from unimm.inference import images
  from unimm.models import autoencoders
  model, params = tiny()
  # The patch layer's output starts at zero (ε = 0 whatever the input): perturb every weight.
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(3), p.shape), params)
  task = transfusion.TransfusionTask(model, autoencoders.AutoencoderConfig(), diffusion.Schedule.cosine())
  specials = SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4, img=5, reserved=())
  prompts = [[10, 11, 12], [13], [14, 15, 16, 17, 18]]
  padded = np.zeros((3, 5), np.int32)
  for i, p in enumerate(prompts):
    padded[i, :len(p)] = p
  key = jax.random.key(7)
  want = task.sample_images(params, padded, np.array([3, 1, 5]), key, specials=specials, num_steps=6,
                            guidance=3.0, image_channels=1)
  got = images.ImageGenerator(task, params, specials).generate(prompts, key, num_steps=6, guidance=3.0,
                                                               image_channels=1)
  assert got.shape == (3, 4, 4, 1) and got.dtype == np.uint8
  assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # rounding of near-equal floats
  assert len({im.tobytes() for im in got}) == 3  # the caption matters: the comparison is not vacuous
