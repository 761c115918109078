"""The whole pipeline: host sharding, exact resume, mixtures, bad records, `prepare`."""

import base64
import collections
import hashlib
import io
import json

from array_record.python.array_record_module import ArrayRecordWriter
import grain
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from unimm.data import documents, packed, pipeline, prepare, records


def image_key(pixels):
  return hashlib.sha1(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def batch_images(batches):
  return collections.Counter(image_key(im) for b in batches for im in b["images"][b["image_valid"]])


def test_two_hosts_read_disjoint_shards_covering_the_split(shapes_config, data_dir):
  shapes_config.data.batch_size = 4
  per_host = []
  for index in range(2):
    it = pipeline.build_pipeline(shapes_config, "validation", index, 2, num_epochs=1)
    per_host.append(batch_images(list(it)))
  whole = collections.Counter(image_key(ex["image"]) for ex in
                              tfds.data_source("shapes/small", split="validation", data_dir=data_dir))
  assert sum(whole.values()) == 200
  assert per_host[0] + per_host[1] == whole
  assert abs(sum(per_host[0].values()) - sum(per_host[1].values())) <= 1
  # Distinct images of the split (jitter makes duplicates rare) land on one host only.
  assert not {k for k in per_host[0] if whole[k] == 1} & {k for k in per_host[1] if whole[k] == 1}


def assert_batches_equal(got, want):
  for a, b in zip(got, want, strict=True):
    for k in packed.ROW_FIELDS + packed.IMAGE_FIELDS:
      np.testing.assert_array_equal(a[k], b[k])


def test_pipeline_resumes_exactly_with_orbax(shapes_config, tmp_path):
  it = pipeline.build_pipeline(shapes_config, "train")
  for _ in range(3):
    next(it)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  want = [next(it) for _ in range(3)]
  fresh = pipeline.build_pipeline(shapes_config, "train")
  mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert_batches_equal([next(fresh) for _ in range(3)], want)


def test_data_shards_fix_the_global_batch_across_process_counts(shapes_config, tmp_path):
  """One process packing both data shards yields the rows two processes (one shard each) yield, stacked;
  its state (both shards') saves with orbax and resumes exactly."""
  shapes_config.data.batch_size = 4
  shapes_config.data.shards = 2
  per_process = [pipeline.build_pipeline(shapes_config, "train", index, 2) for index in range(2)]
  both = pipeline.build_pipeline(shapes_config, "train", 0, 1)
  for _ in range(3):
    parts = [next(it) for it in per_process]
    fields = packed.ROW_FIELDS + packed.IMAGE_FIELDS
    assert_batches_equal([next(both)], [{k: np.concatenate([p[k] for p in parts]) for k in fields}])
  assert parts[0]["tokens"].shape[0] == 2
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(both)))
  mngr.wait_until_finished()
  want = [next(both) for _ in range(2)]
  fresh = pipeline.build_pipeline(shapes_config, "train", 0, 1)
  mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert_batches_equal([next(fresh) for _ in range(2)], want)
  shapes_config.data.shards = 3
  with pytest.raises(ValueError, match="does not split over 2 processes"):
    pipeline.build_pipeline(shapes_config, "train", 0, 2)


def test_pipeline_with_worker_processes_resumes(shapes_config):
  from absl import flags
  flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags
  shapes_config.data.worker_count = 2
  shapes_config.data.batch_size = 4
  it = pipeline.build_pipeline(shapes_config, "train")
  next(it)
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  fresh = pipeline.build_pipeline(shapes_config, "train")
  fresh.set_state(state)
  assert_batches_equal([next(fresh) for _ in range(3)], want)


def png(pixels):
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def write_jsonl(path, rows):
  with open(path, "wb") as f:
    for row in rows:
      f.write(row if isinstance(row, bytes) else json.dumps(row).encode())
      f.write(b"\n")


def test_prepare_jsonl_and_parquet(tmp_path):
  red = np.zeros((20, 30, 3), np.uint8)
  red[..., 0] = 255
  (tmp_path / "img").mkdir()
  Image.fromarray(red).save(tmp_path / "img" / "red.png")
  write_jsonl(tmp_path / "a.jsonl", [
      {"parts": [{"text": "a red picture"}, {"image": "img/red.png"}], "pair": True},
      {"parts": [{"text": "question?", "loss_weight": 0}, {"image_base64": base64.b64encode(png(red)).decode()},
                 {"text": "answer"}]},
      {"parts": [{"text": "just text"}]},
      b"{not json",
      b'{"parts": [{"text": "\xff\xfe"}]}',  # not UTF-8
      {"parts": []},
      {"parts": [{"image": "img/missing.png"}]},
      {"parts": [{"image_base64": base64.b64encode(b"not an image").decode()}]},
  ])
  table = pa.table({
      "parts": [[{"text": "parquet text", "image": None, "image_path": None, "loss_weight": None}],
                [{"text": None, "image": png(red), "image_path": None, "loss_weight": None},
                 {"text": "after", "image": None, "image_path": None, "loss_weight": 1.0}]],
      "pair": [False, False]})
  pq.write_table(table, tmp_path / "b.parquet")
  summary = prepare.prepare([str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")], str(tmp_path / "out"),
                            image_size=8, channels=3, workers=2)
  assert summary == {"files": 2, "written": 5, documents.CORRUPT: 1, documents.BAD_TEXT: 1,
                     documents.EMPTY: 1, documents.BAD_IMAGE: 2, "failed_files": [], "resumed_files": 0}
  src = grain.sources.ArrayRecordDataSource(sorted(str(p) for p in (tmp_path / "out").glob("*.array_record")))
  docs = [records.decode_document(src[i]) for i in range(len(src))]
  assert docs[0].is_pair and docs[0].parts[0] == documents.Text("a red picture")
  pixels = docs[0].parts[1].pixels
  assert pixels.shape == (8, 8, 3) and (pixels[..., 0] > 250).all() and (pixels[..., 1:] < 5).all()
  assert docs[1].parts[0] == documents.Text("question?", 0.0) and docs[1].parts[2] == documents.Text("answer")
  assert [type(p).__name__ for p in docs[4].parts] == ["Image", "Text"]


def prepared_config(shapes_config, tmp_path, sources):
  config = shapes_config
  config.data.sources = mlc.ConfigDict({
      name: {"kind": "prepared", "path": str(path), "weight": weight} for name, (path, weight) in sources.items()})
  config.data.image_size = 8
  config.data.image_channels = 3
  config.data.batch_size = 2
  return config


def test_bad_records_skipped_and_counted(shapes_config, tmp_path):
  good = np.full((8, 8, 3), 9, np.uint8)
  recs = [records.encode_document([{"text": f"a red circle {i}"}, {"image": records.encode_image(good)}])
          for i in range(20)]
  bad = {
      documents.CORRUPT: [b"\x00garbage", b""],
      documents.BAD_TEXT: [records.encode_document([{"text": "Q"}]).replace(b"Q", b"\xff")],
      documents.BAD_IMAGE: [records.encode_document([{"image": records.encode_image(np.zeros((4, 8, 3), np.uint8))}]),
                            records.encode_document([{"image": records.encode_image(np.zeros((8, 8, 1), np.uint8))}]),
                            records.encode_document([{"image": b"\x89PNG broken"}])],
      documents.EMPTY: [records.encode_document([{"text": ""}])],
  }
  path = tmp_path / "mixed.array_record"
  writer = ArrayRecordWriter(str(path), "group_size:1")
  for i, rec in enumerate(recs):
    writer.write(rec)
    for reason in bad:
      if i < len(bad[reason]):
        writer.write(bad[reason][i])
  writer.close()
  config = prepared_config(shapes_config, tmp_path, {"mixed": (path, 1.0)})
  batches = list(pipeline.build_pipeline(config, "train", num_epochs=1, shuffle=False))
  totals = {r: int(sum(b["stats"][r].sum() for b in batches)) for r in documents.SKIP_REASONS}
  assert totals == {**{r: 0 for r in documents.SKIP_REASONS}, **{r: len(v) for r, v in bad.items()}}
  assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) == 20  # every good one kept


def test_mixture_weights(shapes_config, tmp_path):
  def shard(name, n, with_image):
    parts = [{"text": name}] + ([{"image": records.encode_image(np.zeros((8, 8, 3), np.uint8))}] if with_image else [])
    path = tmp_path / f"{name}.array_record"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for _ in range(n):
      writer.write(records.encode_document(parts))
    writer.close()
    return path
  config = prepared_config(shapes_config, tmp_path, {
      "text": (shard("text", 50, False), 3.0), "pairs": (shard("pairs", 30, True), 1.0)})
  config.data.batch_size = 8
  it = pipeline.build_pipeline(config, "train")
  tok = pipeline.load_tokenizer(config.data)
  with_image = without = 0
  for _ in range(15):
    b = next(it)
    images = b["image_valid"].sum()
    with_image += images
    without += b["segment_ids"].max(axis=1).sum() - images
  frac = without / (with_image + without)
  assert abs(frac - 0.75) < 0.05, frac
  assert tok.vocab_size > 0


def test_prepare_splits_inputs_across_hosts(tmp_path):
  for i in range(5):
    write_jsonl(tmp_path / f"part{i}.jsonl", [{"parts": [{"text": f"doc {i} {j}"}]} for j in range(i + 1)])
  pattern = str(tmp_path / "part*.jsonl")
  a = prepare.prepare([pattern], str(tmp_path / "out"), host_index=0, host_count=2, workers=1)
  b = prepare.prepare([pattern], str(tmp_path / "out"), host_index=1, host_count=2, workers=1)
  assert (a["files"], b["files"]) == (3, 2) and a["written"] + b["written"] == 15
  assert sorted(p.name for p in (tmp_path / "out").glob("*.array_record")) == [f"part{i}.array_record" for i in range(5)]


def token_shares(config, batches: int = 12) -> float:
  """The share of trained rows' tokens that belong to text-only documents (no image in their segment)."""
  it = pipeline.build_pipeline(config, "train")
  text = total = 0
  for _ in range(batches):
    b = next(it)
    for seg, img in zip(b["segment_ids"], b["image_ids"]):
      for s in range(1, seg.max() + 1):
        where = seg == s
        total += where.sum()
        text += where.sum() * (not img[where].any())
  return text / total


def test_mix_by_tokens_gives_the_token_ratio(shapes_config):
  """Text-only captions (~15 tokens) and image–caption pairs (~80) mixed 1:1: by documents, text is a
  small share of the tokens; by tokens (the Transfusion paper's 1:1), about half."""
  shapes_config.data.sources = {
      "text": {"kind": "tfds", "tfds_name": "shapes", "builder_config": "small", "weight": 1.0, "text_only": True},
      "pairs": {"kind": "tfds", "tfds_name": "shapes", "builder_config": "small", "weight": 1.0}}
  shapes_config.data.batch_size = 8
  shapes_config.model.patch_size = 4  # 64-slot images: a pair is ~80 tokens (the demo's 8×8 patches make it ~33)
  shapes_config.data.max_images_per_row = 4
  by_documents = token_shares(shapes_config)
  shapes_config.data.mix_by = "tokens"
  by_tokens = token_shares(shapes_config)
  assert by_documents < 0.3 and 0.4 < by_tokens < 0.6, (by_documents, by_tokens)
  shapes_config.data.mix_by = "bytes"
  with pytest.raises(ValueError, match="mix_by='bytes'"):
    pipeline.build_pipeline(shapes_config, "train")
