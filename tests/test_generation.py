"""KV-cached generation equals recomputing the whole row every step (text, captions, images)."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm import diffusion
from unimm.data import documents, packed
from unimm.data.tokenizer import SpecialIds
from unimm.inference import images as images_lib, prompts as prompts_lib, sampling, text
from unimm.models import autoencoders, backbone, transfusion

SPECIALS = SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4, img=5, reserved=())
SLOTS = 4  # 4×4×1 images in 2×2 patches


def tiny_task(perturb=False, objective="ddpm"):
  cfg = backbone.BackboneConfig(num_layers=2, dim=32, num_heads=4, dtype="float32", remat="none", scan=True,
                                attention="xla")
  model = transfusion.TransfusionModel(vocab_size=40, backbone=cfg, latent_shape=(4, 4, 1), max_images=2,
                                       patch_size=2)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), packed.Rows(tokens, tokens, tokens, tokens),
                               jnp.zeros((1, 2, 4, 4, 1)), jnp.zeros((1, 2), jnp.int32))["params"]
  params = nn.meta.unbox(params)
  # Sharpen the LM head so greedy decoding is never a near-tie.
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 8.0
  if perturb:  # the patch layer's output starts at zero (ε = 0 whatever the input)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(3), p.shape), params)
  task = transfusion.TransfusionTask(model, autoencoders.AutoencoderConfig(), diffusion.Schedule.cosine(),
                                     image_shape=(4, 4, 1), objective=objective)
  return task, params


class FakeTokenizer:
  specials = SPECIALS

  def encode(self, s):
    return [10 + int(w) for w in s.split()]


def prompt(words="", image=None):
  parts = [documents.Text(words)] if words else []
  if image is not None:
    parts.append(documents.Image(image))
  return prompts_lib.encode(parts, FakeTokenizer(), SLOTS)


def uncached_greedy(task, params, p, max_new):
  """Reference: run the whole row (one document, images clean at t=0) again for every new token."""
  apply = jax.jit(task.model.apply)
  tokens, image_ids = list(p.tokens), list(p.image_ids)
  latents = jnp.zeros((1, 2, 4, 4, 1))
  for k, im in enumerate(p.images):
    latents = latents.at[0, k].set(autoencoders.to_unit(jnp.asarray(im)))
  out = []
  width = 48  # one compiled shape: right padding (segment 0) changes nothing before it
  for _ in range(max_new):
    n = len(tokens)
    pad = [0] * (width - n)
    rows = packed.Rows(jnp.asarray([tokens + pad]), jnp.asarray([list(range(n)) + pad]),
                       jnp.asarray([[1] * n + pad]), jnp.asarray([image_ids + pad]))
    logits, _ = apply({"params": params}, rows, latents, jnp.zeros((1, 2), jnp.int32))
    tok = int(jnp.argmax(logits[0, n - 1]))
    out.append(tok)
    if tok == SPECIALS.eos:
      break
    tokens.append(tok)
    image_ids.append(0)
  return out


def test_cached_text_and_captions_equal_uncached():
  task, params = tiny_task(perturb=True)
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (4, 4, 1), dtype=np.uint8)
  prompts = [prompt("1 5 9"), prompt("", image), prompt("3 4 8 12 20 21", image), prompt("7")]
  gen = text.TextGenerator(text.DiffusionStepper(task, params, SPECIALS))
  got = gen.generate(prompts, max_new_tokens=[10, 10, 10, 3])
  for p, tokens, budget in zip(prompts, got, [10, 10, 10, 3]):
    assert tokens == uncached_greedy(task, params, p, budget)
    assert len(tokens) == budget or tokens[-1] == SPECIALS.eos
  assert len({tuple(t) for t in got}) == 4


@pytest.mark.parametrize("objective,sampler", [("ddpm", None), ("flow", "euler"), ("flow", "heun")])
def test_cached_image_sampler_equals_full_recompute(objective, sampler):
  task, params = tiny_task(perturb=True, objective=objective)
  captions = [[10, 11, 12], [13], [14, 15, 16, 17, 18]]
  padded = np.zeros((3, 5), np.int32)
  for i, c in enumerate(captions):
    padded[i, :len(c)] = c
  key = jax.random.key(7)
  want = task.sample_images(params, padded, np.array([3, 1, 5]), key, specials=SPECIALS, num_steps=6,
                            guidance=3.0, image_channels=1, sampler=sampler)
  prompts = [prompts_lib.Prompt([SPECIALS.bos, *c], [0] * (len(c) + 1), []) for c in captions]
  got = images_lib.ImageGenerator(task, params, SPECIALS).generate(prompts, key, num_steps=6, guidance=3.0,
                                                                   sampler=sampler)
  assert got.shape == (3, 4, 4, 1) and got.dtype == np.uint8
  assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # rounding of near-equal floats
  assert len({im.tobytes() for im in got}) == 3  # the caption matters: the comparison is not vacuous


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 400)

  def draws(opts):
    return np.array([int(text.sample_tokens(logits, k, opts)[0]) for k in keys])
  assert set(draws(sampling.SamplingOptions(temperature=1.0, top_k=2))) == {0, 1}
  assert set(draws(sampling.SamplingOptions(temperature=1.0, top_p=0.7))) == {0, 1}  # 0.5 + 0.3 covers 0.7
  assert set(draws(sampling.SamplingOptions(temperature=1.0, top_p=0.5))) == {0}
  assert int(text.sample_tokens(logits, keys[0], sampling.SamplingOptions())[0]) == 0  # greedy
  full = draws(sampling.SamplingOptions(temperature=1.0))
  assert abs((full == 0).mean() - 0.5) < 0.1 and (full == 3).any()


def test_prompt_batch_is_left_padded():
  image = np.full((4, 4, 1), 9, np.uint8)
  rows, images = prompts_lib.batch([prompt("1 2"), prompt("", image)], pad_id=0, max_images=2,
                                   image_shape=(4, 4, 1), multiple=4)
  assert rows.tokens.shape == (2, 8)
  assert rows.tokens[0].tolist() == [0, 0, 0, 0, 0, 1, 11, 12]
  assert rows.tokens[1].tolist() == [0, 1, 3, 5, 5, 5, 5, 4]
  assert rows.segment_ids[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
  assert rows.positions[1].tolist() == [0, 0, 1, 2, 3, 4, 5, 6]
  assert rows.image_ids[1].tolist() == [0, 0, 0, 1, 1, 1, 1, 0]
  assert (images[1, 0] == 9).all() and not images[1, 1].any()


@pytest.mark.slow
def test_sharded_generation_equals_single_device():
  """Text, mixed-modal and image generation on 8 fake devices (data × fsdp × tensor) = one device
  (Transfusion and Chameleon)."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharded_generation_check.py")
  out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  r = json.loads(out.stdout.split("RESULT ", 1)[1])
  one, eight = r["one"], r["eight"]
  assert r["devices"] == 8
  assert one["plain"] == eight["plain"] and one["mixed_tokens"] == eight["mixed_tokens"]
  assert sum(len(x) for x in one["mixed_images"]) >= 2  # the mixed path really drew images
  for a, b in [(one["images"], eight["images"]), *zip(one["mixed_images"], eight["mixed_images"])]:
    assert np.abs(np.asarray(a) - np.asarray(b)).max(initial=0) <= 1
  up = next(v for k, v in eight["specs"].items() if "up" in k and "kernel" in k)
  assert "fsdp" in up and "tensor" in up, up  # parameters placed by the training rules
  # Chameleon's constrained, guided code decoding too.
  assert one["codes"]["tokens"] == eight["codes"]["tokens"]
  assert np.abs(np.asarray(one["codes"]["images"]) - np.asarray(eight["codes"]["images"])).max() <= 1


def test_guidance_scale_one_equals_conditional_sampling():
  """CFG at s = 1 (conditional and unconditional rows in one batch) = sampling without the twins."""
  task, params = tiny_task(perturb=True)
  prompts = [prompt("1 2 3"), prompt("7")]
  gen = images_lib.ImageGenerator(task, params, SPECIALS)
  key = jax.random.key(3)
  guided = gen.generate(prompts, key, num_steps=6, guidance=1.0)
  conditional = gen.generate(prompts, key, num_steps=6, guidance=None)
  assert np.abs(guided.astype(int) - conditional.astype(int)).max() <= 1
  strong = gen.generate(prompts, key, num_steps=6, guidance=5.0)
  assert np.abs(strong.astype(int) - conditional.astype(int)).max() > 10  # guidance is not a no-op
