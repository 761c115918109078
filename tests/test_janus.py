"""Janus: roles of images, the loss, freezing by stage, guided and cached decoding; SigLIP's loss."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from test_chameleon import CODEBOOK, IMAGE, SLOTS, SPECIALS, TEXT_VOCAB, FakeTokenizer, prompt, random_images
from test_chameleon import tiny_tokenizer
from unimm.data import documents, layout, packed, packing
from unimm.inference import codes, prompts as prompts_lib, text as text_lib
from unimm.models import backbone, code_images, janus, vit
from unimm.train import step as step_lib

VIT = vit.ViTConfig(patch_size=2, width=16, depth=2, num_heads=2, mlp_dim=32, dtype="float32", remat=False)
ADAPTORS = ("und_aligner", "gen_embed", "gen_aligner", "gen_head")


@functools.lru_cache(maxsize=None)
def tiny_task():
  cfg = backbone.BackboneConfig(num_layers=2, dim=32, num_heads=4, dtype="float32", remat="none", scan=True,
                                attention="xla", bidirectional_images=False)
  tokenizer, tok_params = tiny_tokenizer()
  model = janus.JanusModel(text_vocab=TEXT_VOCAB, codebook_size=CODEBOOK, code_dim=tokenizer.cfg.code_dim,
                           backbone=cfg, vision=VIT, max_images=2, slots=SLOTS, image_shape=IMAGE)
  task = janus.JanusTask(model=model, codes=code_images.CodeImages(tokenizer, tok_params, TEXT_VOCAB, IMAGE))
  params = nn.meta.unbox(jax.jit(task.init)(jax.random.key(0), packed_batch()))
  # Sharper heads: no near-ties under greedy decoding.
  params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 8.0
  params["gen_head"]["fc2"]["kernel"] = params["gen_head"]["fc2"]["kernel"] * 8.0
  return task, params


@functools.lru_cache(maxsize=None)
def apply_fn():
  """The tiny model's apply, compiled once per input shape."""
  return jax.jit(tiny_task()[0].model.apply)


@functools.lru_cache(maxsize=None)
def row_tokens():
  return np.asarray(jax.jit(lambda batch: tiny_task()[0].batch_inputs(batch)[0].tokens)(packed_batch()))


def laid_out(doc, opts, seed=0):
  return layout.layout_document(doc, FakeTokenizer(), opts, np.random.default_rng(seed))


OPTS = layout.LayoutOptions(image_shape=IMAGE, image_slots=SLOTS, caption_first_prob=1.0, caption_dropout=0.0,
                            image_token_weight=1.0, train_read_images=False)


@functools.lru_cache(maxsize=None)
def packed_batch():
  """Row 1: a caption-first pair (image written); row 2: an image-first pair (read) and a text document."""
  im = random_images(2, seed=11)
  gen = laid_out(documents.Document((documents.Text("1 2"), documents.Image(im[0])), is_pair=True), OPTS)
  und = laid_out(documents.Document((documents.Image(im[1]), documents.Text("3 4 5"))), OPTS)
  txt = laid_out(documents.Document((documents.Text("6 7"),)), OPTS)
  rows = [_make_row([gen]), _make_row([und, txt])]
  return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0] if k != "stats"}


def _make_row(frags, length=24, max_images=2):
  return packing.make_row(frags, {}, seq_len=length, max_images=max_images, image_shape=IMAGE, pad_id=SPECIALS.pad)


def log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_roles_pick_the_encoder_and_the_targets():
  task, params = tiny_task()
  batch = packed_batch()
  assert batch["image_written"].tolist() == [[True, False], [False, False]]
  tokens = row_tokens()
  codes_in = tokens >= TEXT_VOCAB
  # Row 1's image slots hold its codes (the frozen tokenizer's, in raster order); row 2's read image keeps IMG.
  slots1 = np.asarray(batch["image_ids"][0]) == 1
  want = np.asarray(task.codes.encode(batch["images"]))[0, 0]
  np.testing.assert_array_equal(tokens[0, slots1], want)
  assert not codes_in[1].any() and (tokens[1, np.asarray(batch["image_ids"][1]) == 1] == SPECIALS.img).all()
  # Only written images' slots (and the EOI after them) are targets; the read image's are not.
  w = np.asarray(batch["loss_weights"])
  assert w[1][np.asarray(batch["image_ids"][1]) == 1].sum() == 0
  assert w[0][np.asarray(batch["image_ids"][0]) == 1].sum() == SLOTS  # codes 2..4 and the EOI
  # The read image enters through the ViT: changing its pixels changes the logits after it, not before.
  apply = apply_fn()
  base = np.asarray(apply({"params": params}, *task.batch_inputs(batch)))
  other = dict(batch, images=batch["images"].at[1, 0].set(255 - batch["images"][1, 0]))
  moved = np.asarray(apply({"params": params}, *task.batch_inputs(other)))
  first = int(np.argmax(np.asarray(batch["image_ids"][1]) == 1))
  np.testing.assert_allclose(moved[1, :first], base[1, :first], atol=1e-6)
  assert np.abs(moved[1, first:] - base[1, first:]).max() > 1e-4
  np.testing.assert_allclose(moved[0], base[0], atol=1e-6)


def test_loss_against_numpy():
  """Text targets under the LM head's softmax over text, written codes under the image head's over codes."""
  task, params = tiny_task()
  batch = packed_batch()
  sums = jax.jit(task.loss_terms)(params, batch, jax.random.key(0))
  counts = task.loss_counts(batch)
  logits = np.asarray(apply_fn()({"params": params}, *task.batch_inputs(batch)), np.float64)
  tokens = row_tokens()
  w = np.asarray(batch["loss_weights"])
  text_sum = image_sum = n_text = n_image = 0.0
  for b in range(tokens.shape[0]):
    for t in range(tokens.shape[1] - 1):
      if w[b, t] == 0:
        continue
      target = tokens[b, t + 1]
      if batch["image_ids"][b, t + 1] > 0:
        image_sum -= w[b, t] * log_softmax(logits[b, t, TEXT_VOCAB:])[target - TEXT_VOCAB]
        n_image += w[b, t]
      else:
        text_sum -= w[b, t] * log_softmax(logits[b, t, :TEXT_VOCAB])[target]
        n_text += w[b, t]
  np.testing.assert_allclose(float(sums["text"]), text_sum, rtol=1e-5)
  np.testing.assert_allclose(float(sums["image"]), image_sum, rtol=1e-5)
  assert float(counts["text"]) == n_text and float(counts["image"]) == n_image == SLOTS
  total, _ = task.combine(sums, counts)
  np.testing.assert_allclose(float(total), (text_sum + image_sum) / (n_text + n_image), rtol=1e-5)


def test_frozen_params_do_not_change_and_hold_no_optimizer_state():
  task, params = tiny_task()
  partition = step_lib.Partition(ADAPTORS)
  optimizer = optax.adam(1e-2)
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=optimizer.init(partition.split(params)[0]))
  step = jax.jit(step_lib.make_train_step(task, optimizer, lambda s: 1e-2, partition=partition))
  batch = packed_batch()
  for i in range(2):
    state, metrics = step(state, batch, jax.random.key(i))
    assert np.isfinite(float(metrics["loss"]))
  before = jax.tree_util.tree_leaves_with_path(params)
  after = dict(jax.tree_util.tree_leaves_with_path(state.params))
  for path, value in before:
    name = jax.tree_util.keystr(path)
    trains = any(f"['{a}']" in name.split("]")[0] + "]" for a in ADAPTORS)
    changed = not np.array_equal(np.asarray(value), np.asarray(after[path]))
    assert changed == trains, name
  # Adam's moments exist for the adaptors and the image head only.
  assert sorted(state.opt_state[0].mu) == sorted(ADAPTORS)
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state[0].mu))
  assert n_opt == sum(x.size for x in jax.tree.leaves({k: params[k] for k in ADAPTORS}))
  try:
    step_lib.Partition(("und_aligner", "vision")).check(params)
  except ValueError as e:
    assert "'vision'" in str(e) and "vision_encoder" in str(e)
  else:
    raise AssertionError("a trainable prefix that names nothing must be refused")


REF_LENGTH = 24


def full_logits(task, params, tokens, images=None):
  """Uncached logits after the last token of one row (`images` read where the row has IMG slots), right-padded
  to one length (causal attention never reads the padding)."""
  del task
  n = len(tokens)
  t = np.full((1, REF_LENGTH), SPECIALS.pad, np.int32)
  t[0, :n] = tokens
  image_ids = np.zeros_like(t)
  k = 0
  for i in range(n):
    if t[0, i] == SPECIALS.img:
      if i == 0 or t[0, i - 1] == SPECIALS.boi:
        k += 1
      image_ids[0, i] = k
  imgs = np.zeros((1, 2, *IMAGE), np.uint8)
  for j, im in enumerate(images or []):
    imgs[0, j] = im
  seg = (np.arange(REF_LENGTH) < n).astype(np.int32)[None]
  out = apply_fn()({"params": params}, packed.Rows(t, np.arange(REF_LENGTH)[None], seg, image_ids), imgs)
  return np.asarray(out)[0, n - 1]


def test_guided_codes_from_one_doubled_cached_batch_equal_two_separate_uncached_passes():
  """CFG: greedy codes drawn from the cache with [conditional; unconditional] rows in one batch equal, code
  by code, the guided argmax of separate full recomputes of the prompt and of its PAD-replaced twin."""
  task, params = tiny_task()
  gen = codes.CodeImageGenerator(task, params, SPECIALS, options=codes.CodeSampling(temperature=0.0))
  prompts = [prompt("1 2 3"), prompt("4")]
  guidance = 5.0
  drawn = []
  orig_draw = gen.steps.draw
  gen.steps.draw = lambda *a, **k: drawn.append(orig_draw(*a, **k)) or drawn[-1]
  images = gen.generate([p for p in prompts for _ in range(2)], jax.random.key(0), guidance=guidance)
  assert images.shape == (4, *IMAGE) and images.dtype == np.uint8
  got = drawn[0][:4]
  np.testing.assert_array_equal(got[0], got[1])  # greedy: a prompt's images agree
  for i, p in enumerate(prompts):
    cond = list(p.tokens) + [SPECIALS.boi]
    uncond = [SPECIALS.bos] + [SPECIALS.pad] * (len(cond) - 2) + [SPECIALS.boi]
    assert task.unconditional_prompt(len(cond), SPECIALS) == uncond
    for s in range(SLOTS):
      c = full_logits(task, params, cond + list(got[2 * i, :s]))
      u = full_logits(task, params, uncond + list(got[2 * i, :s]))
      g = u + guidance * (c - u)
      assert TEXT_VOCAB + int(np.argmax(g[TEXT_VOCAB:])) == got[2 * i, s]
  np.testing.assert_array_equal(images, np.asarray(task.codes.decode(got)))
  # Mid-text images (generate_mixed) get twins of their rows' prefix lengths, written to end where the
  # rows' caches end: their logits equal the PAD prompts' uncached ones.
  logits, _, lengths = codes.CodeStepper(task, params, SPECIALS).uncond_twins(np.array([5, 3]), 32, 12)
  assert lengths.tolist() == [5, 3]
  for row, n in enumerate((5, 3)):
    want = full_logits(task, params, [SPECIALS.bos] + [SPECIALS.pad] * (n - 2) + [SPECIALS.boi])
    np.testing.assert_allclose(np.asarray(logits[row]), want, rtol=1e-4, atol=1e-4)


def test_cached_captioning_reads_the_image_and_equals_uncached():
  task, params = tiny_task()
  gen = text_lib.TextGenerator(codes.CodeStepper(task, params, SPECIALS))
  ims = random_images(2, seed=5)
  prompts = [prompt("", ims[0]), prompt("1", ims[1])]
  outs = gen.generate(prompts, max_new_tokens=5)
  for p, im, out in zip(prompts, ims, outs):
    row = list(p.tokens)
    for tok in out:
      if tok in (SPECIALS.boi, SPECIALS.eos):
        break
      logits = codes.mask_text(jnp.asarray(full_logits(task, params, row, [im]))[None], TEXT_VOCAB, SPECIALS,
                               jnp.asarray([False]))
      assert tok == int(np.argmax(np.asarray(logits)[0]))
      row.append(tok)


def test_layout_roles_pad_dropout_and_source_views():
  im = random_images(1)[0]
  pair = documents.Document((documents.Text("1 2 3"), documents.Image(im)), is_pair=True)
  dropped = laid_out(pair, layout.LayoutOptions(**{**OPTS.__dict__, "caption_dropout": 1.0,
                                                   "caption_dropout_mode": "pad"}))
  assert dropped["tokens"].tolist()[:5] == [SPECIALS.bos, SPECIALS.pad, SPECIALS.pad, SPECIALS.pad, SPECIALS.boi]
  assert dropped["loss_weights"][:3].tolist() == [0.0, 0.0, 0.0] and dropped["image_written"].tolist() == [True]
  read = laid_out(pair, layout.LayoutOptions(**{**OPTS.__dict__, "caption_first_prob": 0.0}))
  assert read["image_written"].tolist() == [False] and read["loss_weights"][1:SLOTS + 2].sum() == 0
  from unimm.data import pipeline  # pylint: disable=g-import-not-at-top
  assert pipeline._SourceView(True, None).map(pair).parts == (documents.Text("1 2 3"),)
  forced = pipeline._SourceView(False, 0.0).map(pair)
  assert forced.caption_first_prob == 0.0
  assert laid_out(forced, OPTS)["image_written"].tolist() == [False]  # overrides the layout's 1.0


# -- SigLIP -----------------------------------------------------------------------------------------

def test_siglip_loss_against_numpy():
  """The sigmoid loss over a packed batch's images and their documents' texts (pooled at each document's
  last token), duplicate captions counted as pairs, against a float64 double loop."""
  text = backbone.BackboneConfig(num_layers=1, dim=16, num_heads=2, dtype="float32", remat="none", scan=False,
                                 attention="xla")
  model = vit.SigLIPModel(vit=VIT, text=text, vocab_size=TEXT_VOCAB, loss=vit.SigLIPLoss(embed_dim=8))
  task = vit.SigLIPTask(model=model, max_images=3)
  opts = layout.LayoutOptions(image_shape=IMAGE, image_slots=1, caption_first_prob=1.0, caption_dropout=0.0)
  ims = random_images(4, seed=2)
  caps = ["1 2", "3", "1 2", "4 5 6"]  # images 0 and 2 share a caption
  frags = [laid_out(documents.Document((documents.Text(c), documents.Image(i)), is_pair=True), opts)
           for c, i in zip(caps, ims)]
  rows = [_make_row(frags[:3], 24, 3), _make_row(frags[3:], 24, 3)]
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0] if k != "stats"}
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), batch)["params"])
  loss = float(task.combine(jax.jit(task.loss_terms)(params, batch, None), task.loss_counts(batch))[0])
  img, txt, scale, bias = (np.asarray(x, np.float64) for x in jax.jit(model.apply)({"params": params}, batch))
  # Reference: image (b, k) ↔ the hidden state at its document's last token, found by a loop.
  flat_img, flat_txt, flat_cap = [], [], []
  for b in range(2):
    seg = np.asarray(batch["segment_ids"][b])
    for k in range(3):
      if not batch["image_valid"][b, k]:
        continue
      s = seg[np.asarray(batch["image_ids"][b]) == k + 1][0]
      flat_img.append(img[b, k])
      flat_txt.append(txt[b, k])
      flat_cap.append(caps[len(flat_cap)])
      assert np.nonzero(seg == s)[0][-1] == np.asarray(vit.document_end(batch["segment_ids"], batch["image_ids"],
                                                                        3)[1])[b, k]
  x = np.array(flat_img) / np.linalg.norm(flat_img, axis=-1, keepdims=True)
  y = np.array(flat_txt) / np.linalg.norm(flat_txt, axis=-1, keepdims=True)
  want = 0.0
  for i in range(4):
    for j in range(4):
      z = 1.0 if flat_cap[i] == flat_cap[j] else -1.0
      want -= np.log(1.0 / (1.0 + np.exp(-z * (scale * x[i] @ y[j] + bias))))
  np.testing.assert_allclose(loss, want / 4, rtol=1e-5)
  np.testing.assert_allclose([scale, bias], [10.0, -10.0], rtol=1e-6)


def test_zero_shot_scores():
  from unimm.eval import evaluate  # pylint: disable=g-import-not-at-top
  image = np.array([[1.0, 0], [0, 1], [1, 0.1]])
  text = np.array([[1.0, 0], [0, 1]])
  out = evaluate.zero_shot_scores(image, text, np.array([0, 1, 1]))
  assert out["image_to_text_accuracy"] == 2 / 3
  assert out["text_to_image_recall_at_1"] == 1.0  # text 1's best image is image 1 (a true one)
  assert out["candidates"] == 2
