"""Chameleon: codes in the vocabulary, the loss, the stability switches, constrained and cached decoding."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm.data import documents, packed
from unimm.data.tokenizer import SpecialIds
from unimm.inference import codes, prompts as prompts_lib, sampling, text
from unimm.models import backbone, chameleon, code_images, vq

SPECIALS = SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4, img=5, reserved=())
TEXT_VOCAB = 40
CODEBOOK = 16
IMAGE = (4, 4, 1)  # → 2×2 codes with one downsampling
SLOTS = 4


@functools.lru_cache(maxsize=None)
def tiny_tokenizer():
  """One small VQ tokenizer (4×4×1 images → 2×2 codes) and its params, shared by every tiny task."""
  cfg = vq.VQConfig(channels=8, channel_mults=(1, 2), blocks_per_level=1, attention=False, z_channels=8,
                    codebook_size=CODEBOOK, code_dim=4)
  tokenizer = vq.VQModel(cfg, 1)
  return tokenizer, nn.meta.unbox(jax.jit(tokenizer.init)(jax.random.key(5), jnp.zeros((1, *IMAGE), jnp.uint8))["params"])


@functools.lru_cache(maxsize=None)
def tiny_task(*, qk_norm=True, z_loss=1e-5, dropout=0.0, norm_order="pre", max_images=2):
  cfg = backbone.BackboneConfig(num_layers=2, dim=32, num_heads=4, dtype="float32", remat="none", scan=True,
                                attention="xla", bidirectional_images=False, qk_norm=qk_norm, dropout=dropout,
                                norm_order=norm_order)
  model = chameleon.ChameleonModel(vocab_size=TEXT_VOCAB + CODEBOOK, backbone=cfg, max_images=max_images,
                                   slots=SLOTS)
  tokenizer, tok_params = tiny_tokenizer()
  task = chameleon.ChameleonTask(model=model, codes=code_images.CodeImages(tokenizer, tok_params, TEXT_VOCAB, IMAGE),
                                 z_loss=z_loss)
  ids = jnp.zeros((1, 8), jnp.int32)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), packed.Rows(ids, ids, ids, ids))["params"])
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 8.0  # no near-ties under greedy decoding
  return task, params


_JITTED = {}


def jitted(task):
  """(row_tokens, logits, model.apply, model.apply with dropout) of `task`, compiled once (tasks are not
  hashable)."""
  if id(task) not in _JITTED:
    def train_apply(params, rows, rng):
      return task.model.apply({"params": params}, rows, rngs={"dropout": rng})
    _JITTED[id(task)] = (jax.jit(lambda batch: task.row_tokens(packed.Rows.of(batch), batch["images"])),
                         jax.jit(task.logits), jax.jit(task.model.apply), jax.jit(train_apply))
  return _JITTED[id(task)]


@functools.lru_cache(maxsize=None)
def shared_batch():
  """A packed batch and its row tokens (every tiny task has the same tokenizer parameters)."""
  task, _ = tiny_task()
  batch = packed_batch(task)
  return batch, jitted(task)[0](batch)


def model_logits(task, params, rng=None):
  """`task.logits` on the shared batch, without recompiling the tokenizer for every model variant."""
  batch, tokens = shared_batch()
  rows = packed.Rows.of(batch).replace(tokens=tokens)
  if rng is None:
    return np.asarray(jitted(task)[2]({"params": params}, rows))
  return np.asarray(jitted(task)[3](params, rows, rng))


def random_images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, *IMAGE)).astype(np.uint8)


class FakeTokenizer:
  specials = SPECIALS

  def encode(self, s):
    return [10 + int(w) for w in s.split()]


def prompt(words="", image=None):
  parts = [documents.Text(words)] if words else []
  if image is not None:
    parts.append(documents.Image(image))
  return prompts_lib.encode(parts, FakeTokenizer(), SLOTS)


def packed_batch(task, seed=0):
  """Two rows: [BOS 11 12 BOI img×4 EOI EOS | BOS BOI img×4 EOI 13 EOS] and one image row, padded."""
  p1 = prompt("1 2", random_images(1, seed)[0])
  p2 = prompt("", random_images(1, seed + 1)[0])
  rows, images = prompts_lib.batch([p1, p2], pad_id=0, max_images=2, image_shape=IMAGE)
  b, t = rows.tokens.shape
  weights = (rows.segment_ids > 0).astype(np.float32)
  weights[:, -1] = 0.0
  fields = {"tokens": rows.tokens, "positions": rows.positions, "segment_ids": rows.segment_ids,
            "image_ids": rows.image_ids, "images": images}
  return {**{k: jnp.asarray(v) for k, v in fields.items()}, "loss_weights": jnp.asarray(weights),
          "image_valid": jnp.asarray(np.array([[1, 0], [1, 0]], bool)),
          "image_t_max": jnp.zeros((b, 2), jnp.int32)}


def test_codes_fill_image_slots_in_raster_order():
  task, _ = tiny_task()
  batch = packed_batch(task)
  images = np.asarray(batch["images"])
  want_codes = np.asarray(task.codes.tokenizer.apply({"params": task.codes.params},
                                               jnp.asarray(images.reshape(-1, *IMAGE)), method=vq.VQModel.encode))
  want_codes = want_codes.reshape(2, 2, SLOTS) + TEXT_VOCAB
  tokens = np.asarray(jitted(task)[0](batch))
  raw, image_ids = np.asarray(batch["tokens"]), np.asarray(batch["image_ids"])
  for r in range(2):
    seen = {}
    for t in range(tokens.shape[1]):
      k = image_ids[r, t]
      if k:
        assert tokens[r, t] == want_codes[r, k - 1, seen.get(k, 0)]
        seen[k] = seen.get(k, 0) + 1
      else:
        assert tokens[r, t] == raw[r, t]
    assert seen == {1: SLOTS}


def cross_entropy64(logits, targets, weights):
  logits = logits.astype(np.float64)
  log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  ce = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return np.sum(ce * weights), np.sum(np.square(log_z) * weights)


@pytest.mark.parametrize("z_loss", [0.0, 1e-5])
def test_loss_is_next_token_on_text_and_codes_with_z_loss(z_loss):
  task, params = tiny_task(z_loss=z_loss)
  batch = packed_batch(task)
  sums = task.loss_terms(params, batch, jax.random.key(0))
  counts = task.loss_counts(batch)
  total, parts = task.combine(sums, counts)
  tokens = np.asarray(jitted(task)[0](batch))
  logits = np.asarray(jitted(task)[1](params, batch))
  w = np.asarray(batch["loss_weights"])[:, :-1]
  ce, zsq = cross_entropy64(logits[:, :-1], tokens[:, 1:], w)
  is_code = np.asarray(batch["image_ids"])[:, 1:] > 0
  assert float(counts["image"]) == pytest.approx(np.sum(w * is_code)) and float(counts["image"]) == 2 * SLOTS
  assert float(total) == pytest.approx((ce + z_loss * zsq) / np.sum(w), rel=1e-5)
  assert float(parts["z_loss"]) == pytest.approx(z_loss * zsq / np.sum(w), rel=1e-5, abs=1e-12)
  img_ce, _ = cross_entropy64(logits[:, :-1], tokens[:, 1:], w * is_code)
  assert float(parts["image_loss"]) == pytest.approx(img_ce / np.sum(w * is_code), rel=1e-5)


def test_attention_is_causal_inside_images():
  """A code's logits do not depend on later codes of the same image (no intra-image bidirectionality)."""
  task, params = tiny_task()
  batch = packed_batch(task)
  tokens = jitted(task)[0](batch)
  first = int(np.argmax(np.asarray(batch["image_ids"])[0] > 0))
  changed = tokens.at[0, first + SLOTS - 1].set(TEXT_VOCAB + (int(tokens[0, first + SLOTS - 1]) - TEXT_VOCAB + 1)
                                                % CODEBOOK)
  def run(tok):
    return jitted(task)[2]({"params": params}, packed.Rows.of(batch).replace(tokens=tok))
  a, b = np.asarray(run(tokens)), np.asarray(run(changed))
  start = int(np.argmax(np.asarray(batch["segment_ids"])[0] > 0))  # rows are left-padded
  np.testing.assert_allclose(a[0, start:first + SLOTS - 1], b[0, start:first + SLOTS - 1], atol=1e-5)
  assert np.abs(a[0, first + SLOTS - 1] - b[0, first + SLOTS - 1]).max() > 1e-3
  with pytest.raises(ValueError, match="bidirectional_images=False"):
    bad = chameleon.ChameleonModel(vocab_size=TEXT_VOCAB + CODEBOOK, backbone=backbone.BackboneConfig(2, 32, 4),
                                  max_images=2, slots=SLOTS)
    ids = jnp.zeros((1, 4), jnp.int32)
    bad.init(jax.random.key(0), packed.Rows(ids, ids, ids, ids))


def test_qk_norm_switch():
  on, params_on = tiny_task(qk_norm=True)
  off, params_off = tiny_task(qk_norm=False)
  names_on = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params_on)}
  names_off = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params_off)}
  assert any("q_norm" in n for n in names_on) and any("k_norm" in n for n in names_on)
  assert not any("q_norm" in n or "k_norm" in n for n in names_off)
  # With QK-norm the attention logits do not grow with the query/key projections' scale.
  scaled = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 50.0 if jax.tree_util.keystr(p).endswith("['q']['kernel']") else x, params_on)
  np.testing.assert_allclose(model_logits(on, params_on), model_logits(on, scaled), atol=1e-3)
  scaled_off = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 50.0 if jax.tree_util.keystr(p).endswith("['q']['kernel']") else x, params_off)
  assert np.abs(model_logits(off, params_off) - model_logits(off, scaled_off)).max() > 1e-2


def test_dropout_and_swin_norm_order_switches():
  task, params = tiny_task(dropout=0.5)
  plain = model_logits(task, params)
  np.testing.assert_array_equal(plain, model_logits(task, params))  # inference: no dropout
  a, b = model_logits(task, params, jax.random.key(1)), model_logits(task, params, jax.random.key(2))
  assert np.abs(a - b).max() > 1e-3 and np.abs(a - plain).max() > 1e-3
  nodrop, _ = tiny_task(dropout=0.0)
  np.testing.assert_allclose(model_logits(nodrop, params, jax.random.key(1)), plain, atol=1e-6)
  swin, _ = tiny_task(norm_order="swin")
  assert np.abs(model_logits(swin, params) - plain).max() > 1e-3  # same parameters, different wiring


def test_swin_layer_matches_its_formula():
  """h = x + norm(attn(x)); out = h + norm(ffn(h)), with the layer's own submodules."""
  cfg = backbone.BackboneConfig(num_layers=1, dim=16, num_heads=2, dtype="float32", remat="none", scan=False,
                                attention="xla", norm_order="swin", bidirectional_images=False)
  layer = backbone.DecoderLayer(cfg)
  x = jax.random.normal(jax.random.key(0), (1, 6, 16))
  ids = jnp.ones((1, 6), jnp.int32)
  pos = jnp.arange(6)[None]
  zeros = jnp.zeros((1, 6), jnp.int32)
  params = nn.meta.unbox(layer.init(jax.random.key(1), x, pos, ids, zeros)["params"])
  got = layer.apply({"params": params}, x, pos, ids, zeros)

  def sub(module, name, *args):
    return module.apply({"params": params[name]}, *args)
  from unimm.models import layers  # pylint: disable=g-import-not-at-top
  attn = sub(backbone.Attention(cfg), "attn", x, pos, ids, zeros)
  h = x + sub(layers.RMSNorm(cfg.norm_eps, "float32"), "attn_norm", attn)
  mlp = sub(layers.SwiGLU(cfg.hidden, "float32"), "mlp", h)
  want = h + sub(layers.RMSNorm(cfg.norm_eps, "float32"), "mlp_norm", mlp)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


# -- decoding -------------------------------------------------------------------------------------

REF_LENGTH = 32


def full_logits(task, params, tokens):
  """Uncached reference: the whole single-document row's next-token logits after its last token
  (right-padded to one length: causal attention never reads the padding)."""
  n = len(tokens)
  t = np.zeros((1, REF_LENGTH), np.int32)
  t[0, :n] = tokens
  seg = (np.arange(REF_LENGTH) < n).astype(np.int32)[None]
  rows = packed.Rows(jnp.asarray(t), jnp.arange(REF_LENGTH)[None], jnp.asarray(seg),
                     jnp.zeros((1, REF_LENGTH), jnp.int32))
  out = jitted(task)[2]({"params": params}, rows)
  return np.asarray(out[0, n - 1])


def prompt_tokens(task, p):
  """A prompt's row with its images' codes in place."""
  rows, images = prompts_lib.batch([p], pad_id=0, max_images=2, image_shape=IMAGE, multiple=1)
  batch = {"tokens": rows.tokens, "positions": rows.positions, "segment_ids": rows.segment_ids,
           "image_ids": rows.image_ids, "images": images}
  return list(np.asarray(jitted(task)[0]({k: jnp.asarray(v) for k, v in batch.items()}))[0])


def test_cached_guided_code_drawing_equals_uncached():
  """Greedy codes under CFG from the cache equal, step by step, the guided argmax of full recomputes of
  [prompt, BOI, codes so far] and [BOS, BOI, codes so far]."""
  task, params = tiny_task()
  gen = codes.CodeImageGenerator(task, params, SPECIALS, options=codes.CodeSampling(temperature=0.0))
  prompts = [prompt("1 2 3"), prompt("4"), prompt("2", random_images(1, 3)[0])]
  guidance = 3.0
  out_codes = []
  orig_draw = gen.steps.draw

  def capture(*args, **kwargs):
    c = orig_draw(*args, **kwargs)
    out_codes.append(c)
    return c
  gen.steps.draw = capture
  images = gen.generate(prompts, jax.random.key(0), guidance=guidance)
  assert images.shape == (3, *IMAGE) and images.dtype == np.uint8
  drawn = out_codes[0][:3]
  assert drawn.shape == (3, SLOTS) and (drawn >= TEXT_VOCAB).all() and (drawn < TEXT_VOCAB + CODEBOOK).all()
  for i, p in enumerate(prompts):
    cond = prompt_tokens(task, p) + [SPECIALS.boi]
    uncond = [SPECIALS.bos, SPECIALS.boi]
    for s in range(SLOTS):
      c = full_logits(task, params, cond + list(drawn[i, :s]))
      u = full_logits(task, params, uncond + list(drawn[i, :s]))
      g = u + guidance * (c - u)
      assert TEXT_VOCAB + int(np.argmax(g[TEXT_VOCAB:])) == drawn[i, s]
  np.testing.assert_array_equal(images, np.asarray(task.codes.decode(drawn)))


def test_cached_text_decoding_equals_uncached():
  task, params = tiny_task()
  gen = text.TextGenerator(codes.CodeStepper(task, params, SPECIALS))
  prompts = [prompt("1 2"), prompt("3", random_images(1, 7)[0]), prompt("4 4 4")]
  outs = gen.generate(prompts, max_new_tokens=6)
  for p, out in zip(prompts, outs):
    row = prompt_tokens(task, p)
    for tok in out:
      logits = np.asarray(codes.mask_text(jnp.asarray(full_logits(task, params, row))[None], TEXT_VOCAB, SPECIALS,
                                          jnp.asarray([sum(1 for t in row if t == SPECIALS.boi) >= 2])))[0]
      if tok == SPECIALS.eoi:
        break  # an image was drawn (checked in the constrained-decoding test)
      assert tok == int(np.argmax(logits))
      row.append(tok)
      if tok == SPECIALS.boi:
        break


def test_constrained_decoding_never_mixes_modalities():
  """Sampling near-uniformly (temperature 100) over text and codes: text never holds a code, an image
  is exactly SLOTS codes then EOI, every image decodes, and rows never exceed their image budget."""
  task, params = tiny_task(max_images=2)
  stepper = codes.CodeStepper(task, params, SPECIALS, options=codes.CodeSampling(temperature=100.0, guidance=None))
  gen = text.TextGenerator(stepper)
  recorded = []
  orig_feed, orig_event = stepper.feed, stepper.draw_images

  def feed(cache, rows):
    recorded.append(("text", np.asarray(rows.tokens)))
    return orig_feed(cache, rows)

  def event(cache, ev, rng, diffusion):
    out = orig_event(cache, ev, rng, diffusion)
    recorded.append(("image", ev.rows.copy()))
    return out
  stepper.feed, stepper.draw_images = feed, event
  orig_draw = stepper.draw
  drawn = []

  def draw(*args, **kwargs):
    c = orig_draw(*args, **kwargs)
    drawn.append(c)
    return c
  stepper.draw = draw
  outs = gen.generate_mixed([prompt("1"), prompt("2 3"), prompt("")] * 4, max_new_tokens=40,
                            rng=jax.random.key(3), options=sampling.SamplingOptions(temperature=100.0))
  total_images = 0
  for o in outs:
    assert all(t < TEXT_VOCAB for t in o.tokens), "a code was emitted as text"
    for i, t in enumerate(o.tokens):
      if t == SPECIALS.boi and i + 1 < len(o.tokens):
        assert o.tokens[i + 1] == SPECIALS.eoi  # the image sits between them (codes are not text tokens)
    assert o.tokens.count(SPECIALS.boi) - (o.tokens[-1] == SPECIALS.boi) == len(o.images) <= 2
    assert all(im.shape == IMAGE and im.dtype == np.uint8 for im in o.images)
    total_images += len(o.images)
  assert total_images > 0 and drawn
  for c in drawn:
    assert c.shape[1] == SLOTS and (c >= TEXT_VOCAB).all() and (c < TEXT_VOCAB + CODEBOOK).all()
  # Text steps never feed a code.
  assert all((toks < TEXT_VOCAB).all() for kind, toks in recorded if kind == "text")


def test_masks():
  logits = jnp.zeros((2, TEXT_VOCAB + CODEBOOK))
  text_only = np.asarray(codes.mask_text(logits, TEXT_VOCAB, SPECIALS, jnp.asarray([False, True])))
  assert np.isinf(text_only[:, TEXT_VOCAB:]).all()
  for special in (SPECIALS.eoi, SPECIALS.img, SPECIALS.pad):
    assert np.isinf(text_only[:, special]).all()
  assert not np.isinf(text_only[0, SPECIALS.boi]) and np.isinf(text_only[1, SPECIALS.boi])
  code_only = np.asarray(codes.mask_codes(logits, TEXT_VOCAB))
  assert np.isinf(code_only[:, :TEXT_VOCAB]).all() and np.isfinite(code_only[:, TEXT_VOCAB:]).all()
  both = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6)))
  np.testing.assert_allclose(np.asarray(codes.guided(both, 2.0)),
                             np.asarray(both[2:] + 2.0 * (both[:2] - both[2:])), atol=1e-6)


def test_score_writes_the_image_heads_logits_at_code_positions(tmp_path):
  """--mode=score on a code family: O/<id>.image.npy holds the code range of the logits at the positions
  that predict an image slot, in order; O/<id>.npy the text range everywhere."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from unimm.inference import score  # pylint: disable=g-import-not-at-top
  task, params = tiny_task()
  config = ml_collections.ConfigDict({"data": {
      "image_size": IMAGE[0], "image_channels": IMAGE[2], "image_slots": SLOTS, "caption_first_prob": 1.0,
      "caption_dropout": 0.0, "max_timestep": 1000, "noise_limit_t": 500, "image_token_weight": 1.0,
      "train_read_images": True, "caption_dropout_mode": "drop", "max_images_per_row": 2, "seq_len": 64}})
  image = random_images(1, 3)[0]
  request = {"id": "r", "line": 1, "parts": [documents.Text("1 2"), documents.Image(image), documents.Text("3")]}
  (row,) = score.run(task, params, FakeTokenizer(), config, [request], str(tmp_path), TEXT_VOCAB)
  text, codes = np.load(tmp_path / "r.npy"), np.load(tmp_path / "r.image.npy")
  # the reference: the same row through the model directly, BOS 11 12 BOI <4 codes> EOI 13 EOS
  p = prompts_lib.encode(request["parts"], FakeTokenizer(), SLOTS)
  tokens = p.tokens + [SPECIALS.eos]
  ids = np.asarray(p.image_ids + [0])
  batch = {"tokens": np.asarray([tokens]), "positions": np.arange(len(tokens))[None],
           "segment_ids": np.ones((1, len(tokens)), np.int32), "image_ids": ids[None],
           "images": np.stack([image, np.zeros_like(image)])[None]}
  full = np.asarray(task.logits(params, {k: jnp.asarray(v) for k, v in batch.items()}))[0]
  np.testing.assert_allclose(text, full[:, :TEXT_VOCAB], rtol=1e-5, atol=1e-5)
  at_codes = np.nonzero(ids[1:] > 0)[0]
  assert len(at_codes) == SLOTS and codes.shape == (SLOTS, CODEBOOK)
  np.testing.assert_allclose(codes, full[at_codes, TEXT_VOCAB:], rtol=1e-5, atol=1e-5)
  assert row["tokens"] == len(tokens) - 1 - SLOTS - 1  # text targets: not the codes, not EOI
