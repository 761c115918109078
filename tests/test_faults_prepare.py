"""Fault injection for `unimm.data.prepare`: bad records of every kind, broken files, escaping paths, image bombs
and re-runs. Each bad input is skipped and counted by reason; nothing else is lost."""

import base64
import collections
import io
import json
import logging
import os
import struct
import zlib

import numpy as np
from PIL import Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from array_record.python.array_record_module import ArrayRecordReader
from unimm.data import documents, prepare, records


def png(pixels) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
  """A PNG that claims `width` x `height` grayscale pixels and holds none (PIL refuses it at open when huge)."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def write_jsonl(path, rows):
  with open(path, "wb") as f:
    for row in rows:
      f.write(row if isinstance(row, bytes) else json.dumps(row).encode())
      f.write(b"\n")


def read_shard(path) -> list[documents.Document]:
  reader = ArrayRecordReader(str(path))
  try:
    return [records.decode_document(r) for r in reader.read_all()]
  finally:
    reader.close()


def texts(docs) -> list[str]:
  return [p.text for d in docs for p in d.parts if isinstance(p, documents.Text)]


# The reasons prepare adds to `documents.SKIP_REASONS`.
BAD_FIELD, BAD_PATH, TOO_LARGE, UNEXPECTED = prepare.BAD_FIELD, prepare.BAD_PATH, prepare.TOO_LARGE, prepare.UNEXPECTED
RED = np.zeros((4, 6, 3), np.uint8)
RED[..., 0] = 255


@pytest.fixture(name="corpus")
def fixture_corpus(tmp_path):
  """tmp_path/corpus with img/red.png, img/big.png (5000x5000, 25 M pixels) and img/link.png, a symlink to
  tmp_path/outside/secret.png (a readable image outside the corpus)."""
  corpus, outside = tmp_path / "corpus", tmp_path / "outside"
  (corpus / "img").mkdir(parents=True)
  outside.mkdir()
  Image.fromarray(RED).save(corpus / "img" / "red.png")
  Image.new("L", (5000, 5000)).save(corpus / "img" / "big.png")
  Image.fromarray(RED).save(outside / "secret.png")
  os.symlink(outside / "secret.png", corpus / "img" / "link.png")
  return corpus


def text_and_image(text, image="img/red.png", **extra):
  return {"parts": [{"text": text}, {"image": image}], **extra}


# (reason, JSON line) for every kind of bad record a JSON lines file can hold.
BAD_LINES = [
    (documents.BAD_TEXT, {"parts": [{"text": "lone \ud800 surrogate"}]}),
    (documents.BAD_TEXT, b'{"parts": [{"text": "\xff\xfe not UTF-8"}]}'),
    (documents.BAD_IMAGE, {"parts": [{"image_base64": "abc"}]}),  # bad padding
    (documents.BAD_IMAGE, {"parts": [{"image": "img/missing.png"}]}),
    (BAD_FIELD, {"parts": [{"text": "w", "loss_weight": "abc"}]}),
    (BAD_FIELD, {"parts": [{"text": "w", "loss_weight": [1]}]}),
    (BAD_FIELD, {"parts": [{"text": "w", "loss_weight": {"a": 1}}]}),
    (BAD_FIELD, {"parts": [{"text": "w", "loss_weight": True}]}),
    (BAD_FIELD, {"parts": [{"text": "w", "loss_weight": -1}]}),
    (BAD_FIELD, b'{"parts": [{"text": "w", "loss_weight": NaN}]}'),
    (BAD_FIELD, text_and_image("a string pair", pair="false")),
    (BAD_FIELD, {"parts": "not a list"}),
    (BAD_FIELD, {"parts": [["not a dict"]]}),
    (BAD_FIELD, {"parts": [{"text": 5}]}),
    (BAD_FIELD, {"parts": [{"image": 7}]}),
    (BAD_FIELD, {"parts": [{"text": "both", "image": "img/red.png"}]}),
    (BAD_FIELD, {"text": "no parts"}),
    (BAD_PATH, text_and_image("escapes", "../outside/secret.png")),
    (BAD_PATH, text_and_image("absolute", "ABSOLUTE")),  # replaced by the fixture's absolute path
    (BAD_PATH, text_and_image("symlink out", "img/link.png")),
    (BAD_PATH, text_and_image("a directory", "img")),
    (TOO_LARGE, text_and_image("a bomb", "img/big.png")),
    (TOO_LARGE, {"parts": [{"image_base64": base64.b64encode(png_header(100_000, 100_000)).decode()}]}),
    (documents.CORRUPT, b"{not json"),
    (documents.CORRUPT, b"[1, 2]"),
    (documents.CORRUPT, {"parts": [{"text": "two images"}, {"image": "img/red.png"}, {"image": "img/red.png"}],
                         "pair": True}),
    (documents.EMPTY, {"parts": []}),
]
GOOD_LINES = [
    text_and_image("a red picture", pair=True),
    {"parts": [{"text": "question?", "loss_weight": 0}, {"text": "answer", "loss_weight": 2}], "pair": None},
    {"parts": [{"text": "absolute inside"}, {"image": "ABSOLUTE_INSIDE"}]},
]


def expected_counts(reasons) -> dict:
  return dict(collections.Counter(reasons))


def test_every_bad_record_is_counted_and_every_good_one_kept(corpus, tmp_path):
  outside = str(tmp_path / "outside" / "secret.png")
  inside = str(corpus / "img" / "red.png")
  def fill(row):
    return row if isinstance(row, bytes) else json.loads(
        json.dumps(row).replace("ABSOLUTE_INSIDE", inside).replace("ABSOLUTE", outside))
  bad_rows = [fill(row) for pair in zip(GOOD_LINES, [r for _, r in BAD_LINES[:3]]) for row in pair]
  bad_rows += [fill(row) for _, row in BAD_LINES[3:]] + [b"", b"  "]  # blank lines are not records
  write_jsonl(corpus / "bad.jsonl", bad_rows)
  write_jsonl(corpus / "clean.jsonl", [{"parts": [{"text": f"clean {i}"}, {"image": "img/red.png"}]} for i in range(3)])
  out = tmp_path / "out"
  summary = prepare.prepare([str(corpus / "*.jsonl")], str(out), image_size=2, max_image_pixels=1_000_000,
                            workers=1)
  want_bad = {"written": 3, **expected_counts(reason for reason, _ in BAD_LINES)}
  assert summary == {"files": 2, "failed_files": [], "resumed_files": 0, **want_bad, "written": 6}
  per_file = json.loads((out / "bad.stats.json").read_text())
  assert {k: v for k, v in per_file.items() if k in want_bad} == want_bad
  assert json.loads((out / "stats.json").read_text()) == summary
  bad_docs, clean_docs = read_shard(out / "bad.array_record"), read_shard(out / "clean.array_record")
  assert texts(bad_docs) == ["a red picture", "question?", "answer", "absolute inside"]
  assert [d.is_pair for d in bad_docs] == [True, False, False]
  assert bad_docs[1].parts[0].loss_weight == 0.0 and bad_docs[1].parts[1].loss_weight == 2.0
  assert bad_docs[0].parts[1].pixels.shape == (2, 2, 3)
  assert texts(clean_docs) == ["clean 0", "clean 1", "clean 2"]
  assert not list(out.glob("*.incomplete"))


def test_unexpected_errors_are_counted_and_logged_with_file_and_line(tmp_path, monkeypatch, caplog):
  encode = records.encode_document
  def flaky_encode(parts, is_pair=False):
    if parts[0].get("text") == "boom":
      raise RuntimeError("injected")
    return encode(parts, is_pair)
  monkeypatch.setattr(records, "encode_document", flaky_encode)
  write_jsonl(tmp_path / "a.jsonl", [{"parts": [{"text": "fine"}]}, {"parts": [{"text": "boom"}]}])
  with caplog.at_level(logging.WARNING):
    summary = prepare.prepare([str(tmp_path / "a.jsonl")], str(tmp_path / "out"), workers=1)
  assert summary["written"] == 1 and summary[UNEXPECTED] == 1
  logged = "\n".join(r.getMessage() + str(r.exc_info) for r in caplog.records)
  assert f"{tmp_path / 'a.jsonl'}:2" in logged and "injected" in logged


@pytest.mark.parametrize("workers", [1, 2])
def test_a_broken_file_loses_nothing_else(tmp_path, workers):
  write_jsonl(tmp_path / "good.jsonl", [{"parts": [{"text": f"good {i}"}]} for i in range(4)])
  (tmp_path / "broken.parquet").write_bytes(np.random.default_rng(0).bytes(4096))
  out = tmp_path / "out"
  out.mkdir()
  (out / "broken.array_record.incomplete").write_bytes(b"stale")  # from a crashed run
  summary = prepare.prepare([str(tmp_path / "good.jsonl"), str(tmp_path / "broken.parquet")], str(out), workers=workers)
  assert summary["files"] == 2 and summary["written"] == 4 and summary["resumed_files"] == 0
  [failed] = summary["failed_files"]
  assert failed["input"] == str(tmp_path / "broken.parquet") and failed["error"]
  assert texts(read_shard(out / "good.array_record")) == [f"good {i}" for i in range(4)]
  assert json.loads((out / "good.stats.json").read_text())["written"] == 4
  assert json.loads((out / "stats.json").read_text()) == summary
  assert sorted(p.name for p in out.iterdir()) == ["good.array_record", "good.stats.json", "stats.json"]


def mixed_row(pair=None, **part):
  """A row of one part with every field of the "mixed" group (pyarrow takes a file's columns from its first row)."""
  return {"parts": [{"text": None, "image_base64": None, "image_path": None, **part}], "pair": pair}


# Rows whose values pyarrow can store in one column each: (reason, row), one file per group (a column has one type).
PARQUET_GROUPS = {
    "pair_string": [(BAD_FIELD, text_and_image("pair as a string", pair="false")),
                    (BAD_FIELD, text_and_image("another", pair="true"))],
    "weight_string": [(BAD_FIELD, {"parts": [{"text": "w", "loss_weight": "abc"}]})],
    "weight_list": [(BAD_FIELD, {"parts": [{"text": "w", "loss_weight": [1.0]}]})],
    "text_number": [(BAD_FIELD, {"parts": [{"text": 5}]})],
    "parts_string": [(BAD_FIELD, {"parts": "not a list"})],
    "part_string": [(BAD_FIELD, {"parts": ["not a dict"]})],
    "mixed": [(documents.BAD_IMAGE, mixed_row(image_base64="abc")),
              (BAD_PATH, mixed_row(image_path="../outside/secret.png")),
              (BAD_PATH, mixed_row(image_path="img/link.png")),
              (TOO_LARGE, mixed_row(image_path="img/big.png")),
              (documents.BAD_TEXT, mixed_row(text="\ud800")),
              (BAD_FIELD, mixed_row(text="w", pair=1)),
              (BAD_FIELD, mixed_row(text="w", pair=0)),
              (BAD_FIELD, mixed_row(text="both", image_path="img/red.png")),
              ("written", {"parts": mixed_row(text="ok")["parts"] + mixed_row(image_path="img/red.png")["parts"],
                           "pair": None}),
              ("written", mixed_row(text="fine"))],
}


def test_parquet_rows_get_the_same_checks_as_json_lines(corpus, tmp_path):
  for name, rows in PARQUET_GROUPS.items():
    rows = [row for _, row in rows]
    write_jsonl(corpus / f"{name}.jsonl", rows)
    if name == "mixed":  # pyarrow cannot store a lone surrogate in a string: give bytes
      rows = [{**row, "parts": [{**p, "text": p["text"].encode("utf-8", "surrogatepass")} if p["text"] else p
                                for p in row["parts"]]} for row in rows]
    pq.write_table(pa.Table.from_pylist(rows), corpus / f"{name}.parquet")
  want = expected_counts(reason for group in PARQUET_GROUPS.values() for reason, _ in group)
  want = {"files": len(PARQUET_GROUPS), "failed_files": [], "resumed_files": 0, **want}
  common = {"image_size": 0, "max_image_pixels": 1_000_000, "workers": 1}
  from_parquet = prepare.prepare([str(corpus / "*.parquet")], str(tmp_path / "pq"), **common)
  from_jsonl = prepare.prepare([str(corpus / "*.jsonl")], str(tmp_path / "jsonl"), **common)
  assert from_parquet == want and from_jsonl == want
  assert texts(read_shard(tmp_path / "pq" / "mixed.array_record")) == ["ok", "fine"]


def test_image_root(corpus, tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  Image.fromarray(RED).save(images / "red.png")
  write_jsonl(corpus / "a.jsonl", [text_and_image("under the root", "red.png"),
                                   text_and_image("absolute under the root", str(images / "red.png")),
                                   text_and_image("next to the file, outside the root", "../corpus/img/red.png"),
                                   text_and_image("absolute outside the root", str(corpus / "img" / "red.png"))])
  summary = prepare.prepare([str(corpus / "a.jsonl")], str(tmp_path / "out"), image_root=str(images), workers=1)
  assert summary["written"] == 2 and summary[BAD_PATH] == 2
  assert texts(read_shard(tmp_path / "out" / "a.array_record")) == ["under the root", "absolute under the root"]


def test_rerun_resumes_complete_files_and_redoes_changed_ones(tmp_path):
  write_jsonl(tmp_path / "a.jsonl", [{"parts": [{"text": "a"}]}, {"parts": []}])
  write_jsonl(tmp_path / "b.jsonl", [{"parts": [{"text": "b"}]}])
  out, pattern = tmp_path / "out", [str(tmp_path / "*.jsonl")]
  first = prepare.prepare(pattern, str(out), workers=1)
  assert first == {"files": 2, "failed_files": [], "resumed_files": 0, "written": 2, documents.EMPTY: 1}
  mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.array_record")}
  (out / "b.array_record.incomplete").write_bytes(b"stale")
  second = prepare.prepare(pattern, str(out), workers=1)
  assert second == {**first, "resumed_files": 2}
  assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.array_record")} == mtimes
  assert not (out / "b.array_record.incomplete").exists()
  with open(tmp_path / "b.jsonl", "ab") as f:
    f.write(json.dumps({"parts": [{"text": "b2"}]}).encode() + b"\n")
  third = prepare.prepare(pattern, str(out), workers=1)
  assert third == {**first, "resumed_files": 1, "written": 3}
  assert (out / "a.array_record").stat().st_mtime_ns == mtimes["a.array_record"]
  assert texts(read_shard(out / "b.array_record")) == ["b", "b2"]
  assert prepare.prepare(pattern, str(out), workers=1, image_size=8)["resumed_files"] == 0  # other settings
  (tmp_path / "b.jsonl").write_bytes(b"\xff" * 10)  # now broken: its old shard must not survive
  os.rename(tmp_path / "b.jsonl", tmp_path / "b.parquet")
  fourth = prepare.prepare([str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")], str(out), workers=1, image_size=8)
  assert fourth["resumed_files"] == 1 and [f["input"] for f in fourth["failed_files"]] == [str(tmp_path / "b.parquet")]
  assert sorted(p.name for p in out.glob("b.*")) == []


def training_source(tmp_path, name, image_sizes):
  """A prepared source of one document per entry: a 'caption' and an image of that side (None: text only)."""
  folder = tmp_path / name
  folder.mkdir()
  rows = [{"parts": [{"text": f"caption {i}"}] + ([] if s is None else [
      {"image_base64": base64.b64encode(png(np.zeros((s, s, 3), np.uint8))).decode()}])}
          for i, s in enumerate(image_sizes)]
  write_jsonl(folder / "train.jsonl", rows)
  prepare.prepare([str(folder / "train.jsonl")], str(folder / "out"), workers=1)
  return {"kind": "prepared", "path": str(folder / "out" / "*.array_record")}


def test_a_mostly_skipped_source_warns_and_an_empty_or_all_skipped_one_fails_naming_it(tmp_path, caplog):
  """Prepared at 16 px, trained at 32: 3 of 4 documents skip as bad_image (the text-only one is fine)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  from unimm.data import pipeline  # pylint: disable=g-import-not-at-top
  from unimm.data.settings import DataSettings  # pylint: disable=g-import-not-at-top
  config = load_config("configs/transfusion/tiny.py").data
  config.sources = ml_collections.ConfigDict({"mostly_bad": training_source(tmp_path, "mostly_bad", [16, 16, 16, None])})
  with caplog.at_level(logging.WARNING):
    pipeline.mixture(DataSettings.from_config(config), "train", shard=0, shards=1, seed=0, num_epochs=None)
  assert "'mostly_bad': 3 of 4 records sampled" in caplog.text and "bad_image" in caplog.text
  assert "data.image_size" in caplog.text  # the fix

  config.sources = ml_collections.ConfigDict({"all_bad": training_source(tmp_path, "all_bad", [16, 16])})
  with pytest.raises(ValueError, match="source 'all_bad': all 2 records sampled .*bad_image"):
    pipeline.mixture(DataSettings.from_config(config), "train", shard=0, shards=1, seed=0, num_epochs=None)
  config.sources = ml_collections.ConfigDict({"empty": training_source(tmp_path, "empty", [])})
  with pytest.raises(ValueError, match="source 'empty' has no records in split 'train'"):
    pipeline.mixture(DataSettings.from_config(config), "train", shard=0, shards=1, seed=0, num_epochs=None)


def test_two_runs_preparing_the_same_embedded_dataset(tmp_path, monkeypatch):
  """Two runs started together both write the embedded dataset; TFDS's final rename fails for the second
  (FileExistsError). The second uses the first's complete copy instead of crashing — and only then."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from unimm.data import sources  # pylint: disable=g-import-not-at-top
  spec = {"kind": "tfds", "tfds_name": "shapes", "builder_config": "small"}
  real = tfds.core.DatasetBuilder.download_and_prepare

  def loses_the_race(self, *args, **kwargs):
    real(self, *args, **kwargs)  # the other run's copy lands …
    (self.data_path.parent / f"incomplete.XYZ_{self.data_path.name}").mkdir()  # … and ours was left half-done
    raise FileExistsError(f"Cannot rename incomplete. Destination {self.data_path} already exists.")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", loses_the_race)
  sources.prepare_embedded(spec, str(tmp_path))
  builder = sources.EMBEDDED["shapes"](data_dir=str(tmp_path), config="small")
  assert builder.data_path.exists() and not list(builder.data_path.parent.glob("incomplete.*"))
  assert len(sources.open_source(spec, "test", str(tmp_path))) == 200

  def fails_alone(self, *args, **kwargs):
    raise FileExistsError("some other FileExistsError, with no dataset written")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fails_alone)
  with pytest.raises(FileExistsError, match="some other"):
    sources.prepare_embedded(spec, str(tmp_path / "elsewhere"))
