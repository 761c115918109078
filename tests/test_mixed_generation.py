"""Mixed-modal generation: a BOI the model emits starts an image, denoised against the cached prefix;
the image enters the cache clean and text continues. Checked against full-row recomputation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from unimm import diffusion
from unimm.data import packed
from unimm.inference import images as images_lib, requests, text
from unimm.models import autoencoders
from test_generation import SLOTS, SPECIALS, prompt, tiny_task

WIDTH = 48  # one compiled shape for the references: right padding (segment 0) changes nothing before it


def full_row(p, generated, latents):
  """The row a generation denotes: prompt, generated tokens, each BOI followed by its image's slots
  (`latents`: the prompt's images, then the generated ones; a last BOI without one stays open)."""
  tokens, image_ids = list(p.tokens), list(p.image_ids)
  count = len(p.images)
  for t in generated:
    if t == SPECIALS.eoi:
      continue  # written with the image below
    tokens.append(t)
    image_ids.append(0)
    if t == SPECIALS.boi and count < len(latents):
      count += 1
      tokens += [SPECIALS.img] * SLOTS + [SPECIALS.eoi]
      image_ids += [count] * SLOTS + [0]
  return tokens, image_ids


@functools.lru_cache
def _jitted_apply(model):
  return jax.jit(model.apply)


def apply_row(task, params, tokens, image_ids, latents, t):
  n = len(tokens)
  pad = [0] * (WIDTH - n)
  lat = jnp.zeros((1, 2, 4, 4, 1))
  for k, x in enumerate(latents):
    lat = lat.at[0, k].set(x)
  rows = packed.Rows(jnp.asarray([tokens + pad]), jnp.asarray([list(range(n)) + pad]),
                     jnp.asarray([[1] * n + pad]), jnp.asarray([image_ids + pad]))
  return _jitted_apply(task.model)({"params": params}, rows, lat, jnp.asarray([t], jnp.int32))


def reference_image(task, params, tokens, image_ids, earlier, noise, options):
  """Full recompute of [prefix BOI slots EOI] and its twin [BOS BOI slots EOI] at every step
  (`earlier`: the row's images so far, clean)."""
  k = len(earlier)  # the new image's index in the row
  row = tokens + [SPECIALS.img] * SLOTS + [SPECIALS.eoi]
  ids = image_ids + [k + 1] * SLOTS + [0]
  twin = [SPECIALS.bos, SPECIALS.boi] + [SPECIALS.img] * SLOTS + [SPECIALS.eoi]
  twin_ids = [0, 0] + [1] * SLOTS + [0]

  def eps_fn(x2, t):
    steps = [0, 0]
    steps[k] = t
    _, c = apply_row(task, params, row, ids, [*earlier, x2[0]], steps)
    _, u = apply_row(task, params, twin, twin_ids, [x2[1]], [t, 0])
    out = jnp.stack([c[0, k], u[0, 0]])
    return task.to_epsilon(out, x2, jnp.full((2,), t, jnp.int32))
  return diffusion.sample(task.schedule, eps_fn, noise[None], num_steps=options.num_steps, clip=task.x0_clip,
                          guidance=options.guidance, sampler=options.sampler or "ddim")[0]


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_mixed_generation_equals_full_recompute(monkeypatch, prediction):
  task, params = tiny_task(perturb=True)
  task.prediction = prediction
  # With these (random) weights greedy decoding draws one image then stops at EOS, two images,
  # none, and one more after the image the prompt holds.
  image = np.random.default_rng(0).integers(0, 256, (4, 4, 1), dtype=np.uint8)
  prompts = [prompt("11 13 12"), prompt("2 5 18"), prompt("1 5 9"), prompt("24 12 5", image)]
  events = []
  real_denoise = images_lib.ImageGenerator.denoise

  def spy(self, cache, first_slot, image_index, rng, options):
    x = real_denoise(self, cache, first_slot, image_index, rng, options)
    events.append((first_slot.copy(), image_index.copy(), rng, np.asarray(x)))
    return x
  monkeypatch.setattr(images_lib.ImageGenerator, "denoise", spy)
  options = images_lib.DiffusionOptions(num_steps=5, guidance=3.0)
  gen = text.TextGenerator(text.DiffusionStepper(task, params, SPECIALS))
  got = gen.generate_mixed(prompts, max_new_tokens=12, diffusion=options)

  assert [g.tokens.count(SPECIALS.boi) for g in got] == [1, 2, 0, 1]
  for g in got:
    assert len(g.images) == g.tokens.count(SPECIALS.boi) == g.tokens.count(SPECIALS.eoi) <= 2
    assert all(b == SPECIALS.boi for b, e in zip(g.tokens, g.tokens[1:]) if e == SPECIALS.eoi)
    assert SPECIALS.img not in g.tokens and SPECIALS.pad not in g.tokens
    assert all(im.shape == (4, 4, 1) and im.dtype == np.uint8 for im in g.images)

  # Each event's images against the full-recompute sampler, from the event's own noise.
  latents = {r: [autoencoders.to_unit(jnp.asarray(im)) for im in p.images] for r, p in enumerate(prompts)}
  drawn = 0
  for first_slot, image_index, rng, x in events:
    n = len(first_slot) // 2
    noise = jax.random.normal(rng, (n, 4, 4, 1), jnp.float32)
    for j in range(n):
      r = next(r for r, p in enumerate(prompts) if len(latents[r]) == image_index[j] and
               first_slot[j] == _first_slot_of(p, got[r].tokens, len(latents[r]) - len(p.images)))
      k = len(latents[r]) - len(prompts[r].images)
      tokens, ids = full_row(prompts[r], _until_boi(got[r].tokens, k), latents[r])
      want = reference_image(task, params, tokens, ids, latents[r], noise[j], options)
      np.testing.assert_allclose(x[j], np.asarray(want), atol=2e-4)
      latents[r].append(jnp.asarray(x[j]))
      drawn += 1
  assert drawn == 4 and got[0].tokens[-1] == SPECIALS.eos

  # Every sampled token (not the EOI that closes an image) is the greedy choice of the full row
  # holding the finished images clean: the image really is in the cache when text continues.
  for r, p in enumerate(prompts):
    toks = got[r].tokens
    for i, tok in enumerate(toks):
      if tok == SPECIALS.eoi:
        continue
      known = latents[r][:len(p.images) + toks[:i].count(SPECIALS.boi)]
      tokens, ids = full_row(p, toks[:i], known)
      logits, _ = apply_row(task, params, tokens, ids, known, [0, 0])
      never = [SPECIALS.eoi, SPECIALS.img, SPECIALS.pad] + ([SPECIALS.boi] if len(known) == 2 else [])
      assert int(jnp.argmax(logits[0, len(tokens) - 1].at[jnp.asarray(never)].set(-jnp.inf))) == tok, (r, i)


def _until_boi(tokens, k):
  """The generated tokens up to and including the (k+1)-th BOI (None if there is none)."""
  seen = 0
  for i, t in enumerate(tokens):
    if t == SPECIALS.boi:
      if seen == k:
        return tokens[:i + 1]
      seen += 1
  return None


def _first_slot_of(p, tokens, k):
  """Position of the (k+1)-th generated image's first slot (None if there is none)."""
  prefix = _until_boi(tokens, k)
  return None if prefix is None else len(p) + len(prefix) + k * SLOTS


class DecodingTokenizer:
  specials = SPECIALS

  def decode(self, ids):
    return "".join(f"<{i}>" for i in ids)


def test_manifest_fields_of_a_text_request_that_drew_images(tmp_path):
  pixels = [np.full((4, 4, 1), v, np.uint8) for v in (10, 200)]
  s = SPECIALS
  generation = text.Generation([20, s.boi, s.eoi, 21, 22, s.boi, s.eoi, s.eos], pixels)
  result = requests.text_result(generation, DecodingTokenizer(), str(tmp_path), "req/1", set())
  assert result == {"text": "<20><21><22>", "images": ["req_1.png", "req_1_2.png"],
                    "parts": [{"text": "<20>"}, {"image": "req_1.png"}, {"text": "<21><22>"},
                              {"image": "req_1_2.png"}]}
  for name, want in zip(result["images"], pixels):
    with Image.open(tmp_path / name) as im:
      assert im.mode == "L" and np.array_equal(np.asarray(im)[..., None], want)
  plain = requests.text_result(text.Generation([20, 21, s.eos], []), DecodingTokenizer(), str(tmp_path), "x", set())
  assert plain == {"text": "<20><21>"}  # the contract's fields only, when no image was drawn
