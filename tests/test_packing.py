"""Packing invariants on random documents, splitting of long documents, conservation, skips, exact resume."""

import collections

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from unimm.data import documents, layout, packed, packing, pipeline

H = W = 4
SLOTS = 5
TAG = 4096  # weight tags: 1 + document * TAG + position (exact in float32 for these corpus sizes)


def random_documents(rng, n, *, bad_every=0, max_parts=5, text_only_every=0):
  """Random interleaved/text-only documents; image pixels encode (doc, image index)."""
  words = ["red", "blue", "circle", "square", "top", "left", "and", "a", "at", "the"]
  docs = []
  for d in range(n):
    if bad_every and d % bad_every == bad_every - 1:
      docs.append(documents.Skipped(documents.CORRUPT))
      continue
    parts = []
    for _ in range(int(rng.integers(1, max_parts + 1))):
      if rng.random() < 0.4 and not (text_only_every and d % text_only_every == 0):
        pixels = np.zeros((H, W, 3), np.uint8)
        pixels[0, 0] = (d % 256, d // 256, sum(isinstance(p, documents.Image) for p in parts))
        parts.append(documents.Image(pixels))
      else:
        parts.append(documents.Text(" ".join(rng.choice(words, int(rng.integers(1, 40))))))
    docs.append(documents.Document(tuple(parts)))
  return docs


def layouts(docs, tok):
  """The unsplit layout (`dict | Skipped`) of each document: what the packer reads."""
  opts = layout.LayoutOptions(image_shape=(H, W, 3), image_slots=SLOTS)
  ds = grain.MapDataset.source(docs).random_map(pipeline._Layout(tok, opts), seed=0)
  return [ds[i] for i in range(len(ds))]


def pack(fragments, tok, *, seq_len=96, max_images=3, num_bins=4, split=True):
  return packing.PackIterDataset(
      grain.MapDataset.source(fragments).to_iter_dataset(), seq_len=seq_len, max_images=max_images,
      image_shape=(H, W, 3), pad_id=tok.specials.pad, num_bins=num_bins, split_long_documents=split)


def segments(row):
  """The positions of each segment of a row."""
  return [np.flatnonzero(row["segment_ids"] == s) for s in range(1, row["segment_ids"].max() + 1)]


def total_skips(rows):
  totals = {r: 0 for r in documents.SKIP_REASONS}
  for row in rows:
    for r, c in row["stats"].items():
      totals[r] += int(c)
  return totals


def assert_rows_equal(a, b):
  for k in packed.ROW_FIELDS + packed.IMAGE_FIELDS:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert a["stats"].keys() == b["stats"].keys()
  for r in a["stats"]:
    np.testing.assert_array_equal(a["stats"][r], b["stats"][r], err_msg=r)


def test_unsplit_packing_skips_long_documents(shapes_tokenizer):
  """split_long_documents=False: documents that do not fit are skipped and counted; the rest packed whole."""
  tok = shapes_tokenizer
  s = tok.specials
  docs = random_documents(np.random.default_rng(0), 400, bad_every=37)
  frags = layouts(docs, tok)
  want, dropped = {}, {r: 0 for r in documents.SKIP_REASONS}
  for i, frag in enumerate(frags):
    if isinstance(frag, documents.Skipped):
      dropped[frag.reason] += 1
    elif len(frag["tokens"]) > 96:
      dropped["too_long"] += 1
    elif len(frag["images"]) > 3:
      dropped["too_many_images"] += 1
    else:
      want[i] = frag
  assert dropped["too_long"] > 0 and dropped["too_many_images"] > 0 and dropped["corrupt"] > 0
  rows = list(pack(frags, tok, split=False))
  seen = {}
  for row in rows:
    packed.check_row(row, boi=s.boi, eoi=s.eoi, img=s.img)
    mask = packed.attention_mask(row["segment_ids"], row["image_ids"])
    for seg in range(1, row["segment_ids"].max() + 1):
      where = row["segment_ids"] == seg
      # No attention across documents.
      assert not mask[np.ix_(where, ~where)].any() and not mask[np.ix_(~where, where)].any()
      tokens = row["tokens"][where]
      image_ks = [k for k in np.unique(row["image_ids"][where]) if k]
      if image_ks:  # the row's images line up with their slots: pixel (0,0) names the doc
        ims = row["images"][np.array(image_ks) - 1]
        key = int(ims[0, 0, 0, 0]) + 256 * int(ims[0, 0, 0, 1])
        assert [int(im[0, 0, 2]) for im in ims] == list(range(len(image_ks)))
        assert all(int(im[0, 0, 0]) + 256 * int(im[0, 0, 1]) == key for im in ims)
      else:
        key = [i for i, f in want.items() if i not in seen and np.array_equal(f["tokens"], tokens)][0]
      np.testing.assert_array_equal(tokens, want[key]["tokens"])
      np.testing.assert_array_equal(row["loss_weights"][where], want[key]["loss_weights"])
      assert key not in seen
      seen[key] = True
  assert set(seen) == set(want)  # every kept document exactly once
  assert total_skips(rows) == dropped
  assert np.mean([(r["segment_ids"] > 0).mean() for r in rows]) > 0.8


def tag_weights(doc: int, frag):
  """`frag` with each position's loss weight replaced by a tag naming (doc, position); 0 at its end."""
  if isinstance(frag, documents.Skipped):
    return frag
  n = len(frag["tokens"])
  assert n < TAG, n
  weights = (1 + doc * TAG + np.arange(n)).astype(np.float32)
  weights[-1] = 0.0
  return {**frag, "loss_weights": weights}


def allowed_chunk(frag, start, end, seq_len, max_images):
  """The chunking rule, brute force: [start, end) fits a row and holds each image it touches whole."""
  ids = frag["image_ids"]
  touched = {int(k) for k in ids[start:end] if k}
  for k in touched:
    slots = np.flatnonzero(ids == k)
    if slots[0] - 1 < start or slots[-1] + 1 >= end:  # BOI, slots and EOI all inside
      return False
  return end - start <= seq_len and len(touched) <= max_images


@pytest.mark.parametrize("seq_len,max_images", [(64, 2), (23, 1)])
def test_split_documents_train_every_target_once(shapes_tokenizer, seq_len, max_images):
  """Long documents are split: against their unsplit layouts, every token is the input of exactly one
  trained position, every target is trained exactly once with its weight, no image is cut, and chunks
  are greedy. Each row position is traced to (document, position) by packing the same fragments with
  tagged loss weights (the packer's placement depends only on lengths and image counts)."""
  tok = shapes_tokenizer
  s = tok.specials
  frags = layouts(random_documents(np.random.default_rng(3), 150, bad_every=29, max_parts=10,
                                   text_only_every=3), tok)
  kept = {i: f for i, f in enumerate(frags) if isinstance(f, dict)}
  assert sum(len(f["tokens"]) > seq_len for f in kept.values()) > len(kept) // 3
  assert sum(len(f["images"]) > max_images for f in kept.values()) > 5
  rows = list(pack(frags, tok, seq_len=seq_len, max_images=max_images))
  tagged_rows = list(pack([tag_weights(i, f) for i, f in enumerate(frags)], tok, seq_len=seq_len,
                          max_images=max_images))
  assert len(rows) == len(tagged_rows)
  chunks = collections.defaultdict(list)  # doc -> [(start, end)] in the unsplit layout
  trained = collections.Counter()  # (doc, position, target token, weight) of every non-final position
  for row, tagged in zip(rows, tagged_rows):
    packed.check_row(row, boi=s.boi, eoi=s.eoi, img=s.img)
    np.testing.assert_array_equal(row["segment_ids"], tagged["segment_ids"])
    for where in segments(row):
      doc, start = divmod(int(tagged["loss_weights"][where[0]]) - 1, TAG)
      frag, t = kept[doc], start + np.arange(len(where))  # t: the unsplit positions this segment holds
      assert t[-1] < len(frag["tokens"])
      np.testing.assert_array_equal(tagged["loss_weights"][where[:-1]], 1 + doc * TAG + t[:-1])
      np.testing.assert_array_equal(row["tokens"][where], frag["tokens"][t])
      assert row["loss_weights"][where[-1]] == 0
      trained.update(zip([doc] * len(t), t[:-1].tolist(), row["tokens"][where[1:]].tolist(),
                         row["loss_weights"][where[:-1]].tolist()))
      for k in np.unique(row["image_ids"][where]):
        if k:  # image k of the row is the whole of the layout's image j, with its pixels and roles
          slots = t[row["image_ids"][where] == k]
          j = int(frag["image_ids"][slots[0]])
          np.testing.assert_array_equal(slots, np.flatnonzero(frag["image_ids"] == j))
          for field in ("images", "image_t_max", "image_written"):
            np.testing.assert_array_equal(row[field][k - 1], frag[field][j - 1])
      assert allowed_chunk(frag, start, start + len(where), seq_len, max_images)
      chunks[doc].append((start, start + len(where)))
  expected = collections.Counter()
  for doc, frag in kept.items():
    n = len(frag["tokens"])
    expected.update(zip([doc] * (n - 1), range(n - 1), frag["tokens"][1:].tolist(),
                        frag["loss_weights"][:-1].tolist()))
    spans = sorted(chunks[doc])
    # Reconstruction: from 0 to the end, each chunk starting at the previous one's last token.
    assert spans[0][0] == 0 and spans[-1][1] == n, (doc, spans)
    assert all(b[0] == a[1] - 1 for a, b in zip(spans, spans[1:])), (doc, spans)
    for start, end in spans[:-1]:  # greedy: no longer chunk was allowed
      assert not any(allowed_chunk(frag, start, e, seq_len, max_images)
                     for e in range(end + 1, min(start + seq_len, n) + 1)), (doc, start, end)
  assert set(chunks) == set(kept)
  assert trained == expected  # every target once, with its weight; every input once
  assert total_skips(rows) == {**{r: 0 for r in documents.SKIP_REASONS},
                               "corrupt": sum(isinstance(f, documents.Skipped) for f in frags)}
  assert np.mean([(r["segment_ids"] > 0).mean() for r in rows]) > 0.8


def test_unsplittable_documents_are_skipped_and_counted(shapes_tokenizer):
  """An image block longer than the row, or an image where rows hold none, cannot be split: skipped."""
  tok = shapes_tokenizer
  img = np.zeros((H, W, 3), np.uint8)
  long_text = documents.Document((documents.Text("red blue circle square top left and a at the " * 3),))
  with_image = documents.Document((documents.Text("a red"), documents.Image(img), documents.Text("circle")))
  frags = layouts([with_image, long_text], tok)
  for seq_len, max_images, reason in [(SLOTS + 1, 1, "too_long"), (16, 0, "too_many_images")]:
    rows = list(pack(frags, tok, seq_len=seq_len, max_images=max_images))
    assert total_skips(rows)[reason] == 1 and sum(total_skips(rows).values()) == 1
    assert sum(len(segments(r)) for r in rows) > 1  # the long text is split
    assert not any(r["image_valid"].any() for r in rows)


@pytest.mark.parametrize("split", [False, True])
def test_too_many_images_split_per_image_budget(shapes_tokenizer, split):
  """With room for one image per row, a three-image document is split into chunks of one image each
  (split_long_documents=False: skipped and counted)."""
  tok = shapes_tokenizer
  s = tok.specials
  images = []
  for i in range(3):
    pixels = np.zeros((H, W, 3), np.uint8)
    pixels[0, 0, 2] = i + 1
    images.append(documents.Image(pixels))
  docs = [documents.Document((documents.Text("a"), images[0], documents.Text("red"), images[1], images[2])),
          documents.Document((documents.Text("a red"), documents.Image(np.zeros((H, W, 3), np.uint8))))]
  rows = list(pack(layouts(docs, tok), tok, max_images=1, split=split))
  for row in rows:
    packed.check_row(row, boi=s.boi, eoi=s.eoi, img=s.img)
  seen = sorted(int(r["images"][0, 0, 0, 2]) for r in rows if r["image_valid"][0])
  assert seen == ([0, 1, 2, 3] if split else [0])
  assert total_skips(rows)["too_many_images"] == (0 if split else 1)


def test_row_exactly_full_in_a_new_bin_is_emitted_at_once(shapes_tokenizer):
  """A fragment (or chunk) that exactly fills a new bin is emitted before the next document is read."""
  tok = shapes_tokenizer
  exact = layouts([documents.Document((documents.Text("red blue circle and a square"),))], tok)[0]
  seq_len = len(exact["tokens"])
  long_text = layouts([documents.Document((documents.Text("red blue circle square top left " * 4),))], tok)[0]
  assert len(long_text["tokens"]) > 2 * seq_len
  for first in (exact, long_text):
    it = iter(pack([first, exact, exact], tok, seq_len=seq_len))
    row = next(it)
    assert it.get_state()["consumed"] == 1
    assert row["segment_ids"].tolist() == [1] * seq_len
    np.testing.assert_array_equal(row["tokens"], first["tokens"][:seq_len])


def assert_resumes_exactly(ds) -> list[dict]:
  """Restores a fresh iterator from the state before every row and checks the rest; returns the states."""
  reference = list(ds)
  it, states = iter(ds), []
  for i in range(len(reference)):
    states.append(it.get_state())
    resumed = iter(ds)
    resumed.set_state(states[-1])
    rest = list(resumed)
    assert len(rest) == len(reference) - i
    for a, b in zip(rest, reference[i:]):
      assert_rows_equal(a, b)
    next(it)
  with pytest.raises(StopIteration):
    next(it)
  return states


def test_exact_resume_at_every_row(shapes_tokenizer):
  docs = random_documents(np.random.default_rng(1), 200, bad_every=11)
  assert_resumes_exactly(pack(layouts(docs, shapes_tokenizer), shapes_tokenizer))


def straddling_documents(tok, seq_len, n=40):
  """Documents of about 2.5 rows (text-only and with images), some short ones between."""
  rng = np.random.default_rng(4)
  docs = random_documents(rng, n, max_parts=12, bad_every=13)
  frags = layouts(docs, tok)
  lengths = [len(f["tokens"]) for f in frags if isinstance(f, dict)]
  assert np.median(lengths) > 2 * seq_len, np.median(lengths)
  return frags


def test_exact_resume_with_split_documents_straddling_saves(shapes_tokenizer):
  """Saves between the chunks of a split document (some emitted, some held or not yet placed) restore exactly."""
  tok = shapes_tokenizer
  ds = pack(straddling_documents(tok, 40), tok, seq_len=40, max_images=2)
  states = assert_resumes_exactly(ds)
  assert sum(bool(st["splitting"]) for st in states) > 5  # saved mid-document
  assert any(chunk > 0 for st in states for b in st["bins"] for _, chunk in b)  # continuation chunks held open


def packer_state(state):
  """The packer's state inside a batch iterator's state."""
  if "splitting" in state:
    return state
  return next(packer_state(v) for v in state.values() if isinstance(v, dict))


def test_resume_through_orbax(shapes_tokenizer, tmp_path):
  tok = shapes_tokenizer
  ds = pack(straddling_documents(tok, 40), tok, seq_len=40, max_images=2).batch(2)
  it = iter(ds)
  steps = 0
  while steps < 3 or not packer_state(it.get_state())["splitting"]:  # save mid-document
    next(it)
    steps += 1
  mngr = ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=2))
  mngr.save(steps, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  want = [next(it) for _ in range(4)]
  fresh = iter(ds)
  mngr.restore(steps, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  for a, b in zip([next(fresh) for _ in range(4)], want):
    assert_rows_equal(a, b)
