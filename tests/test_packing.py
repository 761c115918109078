"""Packing invariants on random documents, conservation, drops, and exact resume."""

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from unimm.data import documents, layout, packed, packing, pipeline

H = W = 4
SLOTS = 5


def random_documents(rng, n, *, bad_every=0):
  """Random interleaved/pair/text-only documents; image pixels encode (doc, image index)."""
  words = ["red", "blue", "circle", "square", "top", "left", "and", "a", "at", "the"]
  docs = []
  for d in range(n):
    if bad_every and d % bad_every == bad_every - 1:
      docs.append(documents.Skipped(documents.CORRUPT))
      continue
    parts = []
    for _ in range(int(rng.integers(1, 6))):
      if rng.random() < 0.4:
        pixels = np.zeros((H, W, 3), np.uint8)
        pixels[0, 0] = (d % 256, d // 256, sum(isinstance(p, documents.Image) for p in parts))
        parts.append(documents.Image(pixels))
      else:
        parts.append(documents.Text(" ".join(rng.choice(words, int(rng.integers(1, 40))))))
    docs.append(documents.Document(tuple(parts)))
  return docs


def packed_rows(docs, tok, *, seq_len=96, max_images=3, num_bins=4):
  opts = layout.LayoutOptions(image_shape=(H, W, 3), image_slots=SLOTS)
  ds = grain.MapDataset.source(docs).random_map(pipeline._Layout(tok, opts), seed=0)
  return packing.PackIterDataset(ds.to_iter_dataset(), seq_len=seq_len, max_images=max_images,
                                 image_shape=(H, W, 3), pad_id=tok.specials.pad, num_bins=num_bins)


def expected_fragments(docs, tok, seq_len=96, max_images=3):
  """The layout of each document the packer should keep, keyed by document index."""
  opts = layout.LayoutOptions(image_shape=(H, W, 3), image_slots=SLOTS)
  ds = grain.MapDataset.source(docs).random_map(pipeline._Layout(tok, opts), seed=0)
  out, dropped = {}, {"too_long": 0, "too_many_images": 0, "corrupt": 0}
  for i in range(len(ds)):
    frag = ds[i]
    if isinstance(frag, documents.Skipped):
      dropped[frag.reason] += 1
    elif len(frag["tokens"]) > seq_len:
      dropped["too_long"] += 1
    elif len(frag["images"]) > max_images:
      dropped["too_many_images"] += 1
    else:
      out[i] = frag
  return out, dropped


def test_packing_invariants_and_conservation(shapes_tokenizer):
  tok = shapes_tokenizer
  s = tok.specials
  rng = np.random.default_rng(0)
  docs = random_documents(rng, 400, bad_every=37)
  want, dropped = expected_fragments(docs, tok)
  assert dropped["too_long"] > 0 and dropped["too_many_images"] > 0 and dropped["corrupt"] > 0
  rows = list(packed_rows(docs, tok))
  seen = {}
  totals = {r: 0 for r in documents.SKIP_REASONS}
  for row in rows:
    for r, c in row["stats"].items():
      totals[r] += int(c)
    packed.check_row(row, boi=s.boi, eoi=s.eoi, img=s.img)
    mask = packed.attention_mask(row["segment_ids"], row["image_ids"])
    for seg in range(1, row["segment_ids"].max() + 1):
      where = row["segment_ids"] == seg
      # No attention across documents.
      assert not mask[np.ix_(where, ~where)].any() and not mask[np.ix_(~where, where)].any()
      tokens = row["tokens"][where]
      image_ks = [k for k in np.unique(row["image_ids"][where]) if k]
      key = None
      if image_ks:  # the row's images line up with their slots: pixel (0,0) names the doc
        ims = row["images"][np.array(image_ks) - 1]
        key = int(ims[0, 0, 0, 0]) + 256 * int(ims[0, 0, 0, 1])
        assert [int(im[0, 0, 2]) for im in ims] == list(range(len(image_ks)))
        assert all(int(im[0, 0, 0]) + 256 * int(im[0, 0, 1]) == key for im in ims)
      else:
        matches = [i for i, f in want.items() if i not in seen and np.array_equal(f["tokens"], tokens)]
        key = matches[0]
      frag = want[key]
      np.testing.assert_array_equal(tokens, frag["tokens"])
      np.testing.assert_array_equal(row["loss_weights"][where], frag["loss_weights"])
      assert key not in seen
      seen[key] = True
  assert set(seen) == set(want)  # every kept document exactly once
  assert totals == {**{r: 0 for r in documents.SKIP_REASONS}, **dropped}
  fill = np.mean([(r["segment_ids"] > 0).mean() for r in rows])
  assert fill > 0.8, fill


def test_exact_resume_at_every_row(shapes_tokenizer):
  docs = random_documents(np.random.default_rng(1), 300, bad_every=11)
  ds = packed_rows(docs, shapes_tokenizer)
  reference = list(ds)
  it = iter(ds)
  for i in range(len(reference)):
    state = it.get_state()
    resumed = iter(ds)
    resumed.set_state(state)
    rest = list(resumed)
    assert len(rest) == len(reference) - i
    for a, b in zip(rest, reference[i:]):
      for k in packed.ROW_FIELDS + packed.IMAGE_FIELDS:
        np.testing.assert_array_equal(a[k], b[k])
      assert a["stats"] == b["stats"]
    next(it)
  with pytest.raises(StopIteration):
    next(it)


def test_resume_through_orbax(shapes_tokenizer, tmp_path):
  docs = random_documents(np.random.default_rng(2), 200)
  ds = packed_rows(docs, shapes_tokenizer).batch(2)
  it = iter(ds)
  for _ in range(5):
    next(it)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=2))
  mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  want = [next(it) for _ in range(4)]
  fresh = iter(ds)
  mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  got = [next(fresh) for _ in range(4)]
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["images"], b["images"])


def test_too_many_images_never_split(shapes_tokenizer):
  """With room for one image per row, a two-image document is dropped, never split."""
  img = np.zeros((H, W, 3), np.uint8)
  docs = [documents.Document((documents.Text("a"), documents.Image(img), documents.Image(img))),
          documents.Document((documents.Text("a red"), documents.Image(img)))]
  rows = list(packed_rows(docs, shapes_tokenizer, max_images=1))
  assert len(rows) == 1 and rows[0]["image_valid"].tolist() == [True]
  assert rows[0]["stats"]["too_many_images"] == 1
