"""Layout of one document: order, caption dropout, noise limits, loss weights."""

import numpy as np
import pytest

from unimm.data import documents, layout

IMAGE = np.full((4, 4, 3), 7, np.uint8)


def opts(**kw):
  base = dict(image_shape=(4, 4, 3), image_slots=3)
  base.update(kw)
  return layout.LayoutOptions(**base)


def pair():
  return documents.Document((documents.Text("a red circle"), documents.Image(IMAGE)), is_pair=True)


def kinds(frag, tok):
  """'t2i', 'i2t' or 'uncond' from where the image lies in the fragment."""
  s = tok.specials
  toks = list(frag["tokens"])
  boi = toks.index(s.boi)
  if boi == 1 and toks[-2] == s.eoi:
    return "uncond"
  return "i2t" if boi == 1 else "t2i"


def test_pair_order_and_dropout_frequencies(shapes_tokenizer):
  n = 4000
  o = opts(caption_first_prob=0.8, caption_dropout=0.1)
  counts = {"t2i": 0, "i2t": 0, "uncond": 0}
  for seed in range(n):
    frag = layout.layout_document(pair(), shapes_tokenizer, o, np.random.default_rng(seed))
    counts[kinds(frag, shapes_tokenizer)] += 1
  # Expected 0.8·0.9, 0.2, 0.8·0.1; 5 binomial standard deviations.
  for kind, p in {"t2i": 0.72, "i2t": 0.2, "uncond": 0.08}.items():
    assert abs(counts[kind] / n - p) < 5 * np.sqrt(p * (1 - p) / n), counts


def test_fragment_structure_and_loss_weights(shapes_tokenizer):
  tok = shapes_tokenizer
  s = tok.specials
  doc = documents.Document((
      documents.Text("a red circle", loss_weight=0.0),  # a masked prompt
      documents.Image(IMAGE),
      documents.Text("a blue square"),
      documents.Image(IMAGE + 1),
  ))
  for image_weight in (0.0, 1.0):
    frag = layout.layout_document(doc, tok, opts(image_token_weight=image_weight), np.random.default_rng(0))
    a, b = tok.encode("a red circle"), tok.encode("a blue square")
    want_tokens = [s.bos, *a, s.boi, s.img, s.img, s.img, s.eoi, *b, s.boi, s.img, s.img, s.img, s.eoi, s.eos]
    assert frag["tokens"].tolist() == want_tokens
    want_ids = [0] * (1 + len(a)) + [0, 1, 1, 1, 0] + [0] * len(b) + [0, 2, 2, 2, 0, 0]
    assert frag["image_ids"].tolist() == want_ids
    # Reference: the weight of predicting tokens[t+1] at t.
    target = []
    for i, t in enumerate(want_tokens):
      if i == 0:
        target.append(0.0)
      elif 1 <= i <= len(a):
        target.append(0.0)  # masked prompt
      elif t == s.img or t == s.eoi:
        target.append(image_weight)
      else:
        target.append(1.0)  # text, BOI, EOS
    np.testing.assert_array_equal(frag["loss_weights"], np.array(target[1:] + [0.0], np.float32))
    # The first image conditions later text: noise-limited; the last does not.
    assert frag["image_t_max"].tolist() == [500, 1000]
    np.testing.assert_array_equal(frag["images"], np.stack([IMAGE, IMAGE + 1]))


def test_image_first_pair_is_noise_limited(shapes_tokenizer):
  o = opts(caption_first_prob=0.0)
  frag = layout.layout_document(pair(), shapes_tokenizer, o, np.random.default_rng(0))
  assert frag["image_t_max"].tolist() == [500]
  o = opts(caption_first_prob=1.0, caption_dropout=0.0)
  frag = layout.layout_document(pair(), shapes_tokenizer, o, np.random.default_rng(0))
  assert frag["image_t_max"].tolist() == [1000]


@pytest.mark.parametrize("doc,reason", [
    (documents.Document(()), documents.EMPTY),
    (documents.Document((documents.Text(""),)), documents.EMPTY),
    (documents.Document((documents.Image(np.zeros((5, 4, 3), np.uint8)),)), documents.BAD_IMAGE),
    (documents.Document((documents.Image(np.zeros((4, 4, 1), np.uint8)),)), documents.BAD_IMAGE),
    (documents.Document((documents.Image(np.zeros((4, 4, 3), np.float32)),)), documents.BAD_IMAGE),
])
def test_bad_documents_become_skips(shapes_tokenizer, doc, reason):
  out = layout.layout_document(doc, shapes_tokenizer, opts(), np.random.default_rng(0))
  assert isinstance(out, documents.Skipped) and out.reason == reason
