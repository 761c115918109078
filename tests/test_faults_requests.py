"""Fault injection for `--mode=sample` (and eval's data): one bad request never kills the run, nothing done is lost.

Every kind of bad request gets its own `error` line while the good ones run; a generation that raises
fails only its request; a run killed mid-way leaves the lines it finished on disk; the exit status says
whether a request failed. In-process, on a randomly initialised 2-layer model and a 40-piece tokenizer.
"""

import contextlib
import dataclasses
import json

from absl import app, flags
from absl.testing import flagsaver
import array_record.python.array_record_module as array_record_module
import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import random_params
from unimm import diffusion, main
from unimm.data import documents, records, shapes, tokenizer as tokenizer_lib
from unimm.eval import evaluate
from unimm import families
from unimm.inference import placement, requests, sampling, text
from unimm.models import autoencoders, backbone, transfusion

IMAGE_SHAPE = (4, 4, 1)  # 2×2 patches: 4 slots an image
CONTEXT = 48


def tiny_task(vocab_size: int):
  cfg = backbone.BackboneConfig(num_layers=2, dim=32, num_heads=4, dtype="float32", remat="none", scan=True,
                                attention="xla")
  model = transfusion.TransfusionModel(vocab_size=vocab_size, backbone=cfg, latent_shape=IMAGE_SHAPE, max_images=2,
                                       patch_size=2)
  params = random_params(model, *model.dummy_inputs(1, 8))
  task = transfusion.TransfusionTask(model, autoencoders.AutoencoderConfig(), diffusion.Schedule.cosine(),
                                     image_shape=IMAGE_SHAPE)
  return task, params


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  """(task, params, tokenizer): a real sentencepiece tokenizer (it is what fails on a lone surrogate)."""
  path = tmp_path_factory.mktemp("tokenizer") / "t.model"
  tok = tokenizer_lib.train_tokenizer(["a red circle", "a blue square", "a green triangle"] * 10, str(path),
                                      vocab_size=40)
  return (*tiny_task(tok.vocab_size), tok)


def write_lines(path, lines) -> str:
  """FILE from `lines`: dicts as JSON, str as UTF-8, bytes as they are."""
  data = [json.dumps(l).encode() if isinstance(l, dict) else l.encode() if isinstance(l, str) else l for l in lines]
  path.write_bytes(b"\n".join(data) + b"\n")
  return str(path)


def run(model, path, out_dir, *, batch_size=32, **parse_options) -> list[dict]:
  task, params, tok = model
  reqs = requests.parse_requests(path, task.image_shape, **parse_options)
  return requests.run_requests(families.get("transfusion"), task, params, tok, reqs, str(out_dir), context=CONTEXT,
                               rng=jax.random.key(0),
                               sampling=sampling.SamplingOptions(), num_steps=2, guidance=3.0, sampler="ddim",
                               batch_size=batch_size)


def text_request(request_id, parts, **fields) -> dict:
  return {"id": request_id, "parts": parts, "generate": "text", **fields}


def manifest(out_dir) -> list[dict]:
  return [json.loads(line) for line in open(out_dir / "manifest.jsonl", encoding="utf-8")]


def test_every_bad_request_gets_its_error_line_and_the_good_ones_run(model, tmp_path, monkeypatch):
  FakeGenerators([-1]).install(monkeypatch, kinds=("image",))  # text runs on the model; images would add ~10 s
  folder = tmp_path / "requests"
  folder.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / "good.png")
  Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(folder / "big.png")  # 1600 pixels
  Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "secret.png")  # exists outside
  (folder / "garbled.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  # (line, the error it must give, or None for a good request); `None` lines are blank.
  cases = [
      (text_request("txt", [{"text": "a red circle"}], max_tokens=4), None),
      ('{"id": "surrogate", "parts": [{"text": "a \\ud800 b"}], "generate": "text"}', "lone surrogate U+D800"),
      (b'{"id": "latin1", "parts": [{"text": "caf\xe9"}], "generate": "text"}', "line 3 is not UTF-8 (byte 0xe9"),
      ({"id": "img", "parts": [{"text": "a blue square"}], "generate": "image"}, None),
      ('{"id": "broken", ', "line 5 is not JSON"),
      ("[1, 2]", "line 6 is not a JSON object but list"),
      (text_request("not_a_list", {"text": "a"}), "parts is {'text': 'a'}; expected a list"),
      (text_request("audio", [{"audio": "x.wav"}]), "unknown part {'audio': 'x.wav'}"),
      (text_request("missing", [{"image": "nope.png"}]), "image file not found: 'nope.png'"),
      (text_request("garbled", [{"image": "garbled.png"}]), "image 'garbled.png' does not decode"),
      (text_request("escape", [{"image": "../secret.png"}]), "image path '../secret.png' leaves"),
      (text_request("absolute", [{"image": str(tmp_path / "secret.png")}]), "leaves"),
      (text_request("bomb", [{"image": "big.png"}]), "40×40 = 1600 pixels; the limit is 1000"),
      ({"id": "video", "parts": [{"text": "a"}], "generate": "video"}, "generate is 'video'; expected"),
      ({"id": "no_generate", "parts": [{"text": "a"}]}, "generate is None; expected 'image' or 'text'"),
      (text_request("budget", [{"text": "a"}], max_tokens=0), "max_tokens is 0; expected a positive integer"),
      ('{"id": "nan", "parts": [], "generate": "text", "max_tokens": NaN}', "NaN is not a JSON number"),
      (None, None),
      (text_request("long", [{"text": "a red circle " * 30}]), f"exceeds the model's context of {CONTEXT}"),
      (text_request("huge_budget", [{"text": "a"}], max_tokens=10 ** 12), "exceeds the model's context"),
      (text_request({"a": 1}, [{"text": "a"}]), "id is {'a': 1}; expected a string or a number"),
      ("[" * 100_000, "line 22 is not JSON: RecursionError"),
      (text_request("cap", [{"image": "good.png"}], max_tokens=3), None),
      ({"id": "img", "parts": [{"text": "a red"}], "generate": "image"}, None),  # a repeated id
      (text_request(7, [{"text": "a blue"}], max_tokens=2), None),  # a numeric id
  ]
  path = write_lines(folder / "requests.jsonl", [b"" if line is None else line for line, _ in cases])
  out_dir = tmp_path / "out"
  rows = run(model, path, out_dir, batch_size=4, max_image_pixels=1000)

  assert rows == manifest(out_dir)  # the completed run's file: in input order
  numbered = [(n, want) for n, (line, want) in enumerate(cases, start=1) if line is not None]
  assert [r["line"] for r in rows] == [n for n, _ in numbered]
  for row, (n, want) in zip(rows, numbered):
    if want is None:
      assert "error" not in row, row
    else:
      assert want in row.get("error", ""), (n, row)
  # Lines without a usable id are named by their number.
  assert {r["line"] for r in rows if r["id"] == f"line{r['line']}"} == {3, 5, 6, 17, 21, 22}
  by_line = {r["line"]: r for r in rows}
  assert by_line[25]["id"] == "7"
  assert by_line[2]["id"] == "surrogate" and by_line[2]["prompt"] == "a \ud800 b"
  assert isinstance(by_line[1]["text"], str) and isinstance(by_line[23]["text"], str)
  assert by_line[4]["image"] != by_line[24]["image"]  # one id, two PNGs
  for line in (4, 24):
    with Image.open(out_dir / by_line[line]["image"]) as im:
      assert im.size == (4, 4) and im.mode == "L"
  assert requests.exit_code(rows) == requests.SOME_FAILED == 3
  assert requests.exit_code([r for r in rows if "error" not in r]) == 0


def test_the_tokenizer_failing_on_a_prompt_fails_only_that_request(model, tmp_path, monkeypatch):
  task, params, tok = model
  FakeGenerators([-1]).install(monkeypatch)

  class PickyTokenizer:
    """The real tokenizer, except on text it is told to refuse (as sentencepiece refuses some input)."""
    specials, decode = tok.specials, tok.decode

    def encode(self, s):
      if "triangle" in s:
        raise RuntimeError("Unable to cast Python instance of type <class 'str'>")
      return tok.encode(s)

  path = write_lines(tmp_path / "r.jsonl", [{"id": "ok", "parts": [{"text": "a red"}], "generate": "text",
                                             "max_tokens": 2},
                                            {"id": "bad", "parts": [{"text": "a triangle"}], "generate": "text"}])
  rows = run((task, params, PickyTokenizer()), path, tmp_path / "out")
  assert "text" in rows[0] and "the prompt does not encode: RuntimeError: Unable to cast" in rows[1]["error"]


class FakeGenerators:
  """Stand-ins for the text and image generators: outputs without a model; a prompt holding `poison`
  raises, and image generation raises `image_error` (a class) when it is set."""

  def __init__(self, poison: list[int], image_error=None):
    self.poison, self.image_error, self.calls = poison, image_error, []

  def _check(self, kind, prompts):
    self.calls.append((kind, len(prompts)))
    if any(self.poison == p.tokens[-len(self.poison):] for p in prompts):
      raise ValueError("the poisoned prompt")

  def generate_mixed(self, prompts, *, max_new_tokens, rng, options, diffusion):
    self._check("text", prompts)
    return [text.Generation([7, 2], []) for _ in prompts]

  def generate(self, prompts, rng, *, num_steps, guidance, sampler):
    if self.image_error:
      raise self.image_error()
    self._check("image", prompts)
    return np.zeros((len(prompts), *IMAGE_SHAPE), np.uint8)

  def install(self, monkeypatch, kinds=("text", "image")):
    """The Transfusion record (what `run` asks for) with these generators in place of `kinds`'."""
    record = dataclasses.replace(families.get("transfusion"),
                                 **{f"{kind}_generator": lambda *a, **k: self for kind in kinds})
    get = families.get
    monkeypatch.setattr(families, "get", lambda name: record if name == "transfusion" else get(name))


def test_a_generation_that_raises_fails_only_its_request(model, tmp_path, monkeypatch):
  tok = model[2]
  fake = FakeGenerators(tok.encode("green"))
  fake.install(monkeypatch)
  lines = [{"id": f"{kind}{k}", "parts": [{"text": "a green" if k == 2 else "a red"}], "generate": kind}
           for kind in ("text", "image") for k in range(4)]
  rows = run(model, write_lines(tmp_path / "r.jsonl", lines), tmp_path / "out", batch_size=4)
  failed = {r["id"]: r["error"] for r in rows if "error" in r}
  assert failed == {"text2": "generation failed: ValueError: the poisoned prompt",
                    "image2": "generation failed: ValueError: the poisoned prompt"}
  assert fake.calls == [("text", 4)] + [("text", 1)] * 4 + [("image", 4)] + [("image", 1)] * 4
  assert [r["image"] for r in rows if r["generate"] == "image" and "error" not in r] == [
      "image0.png", "image1.png", "image3.png"]  # the failed batch's names are not taken
  assert requests.exit_code(rows) == requests.SOME_FAILED


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_a_run_killed_mid_way_keeps_the_lines_it_finished(model, tmp_path, monkeypatch, stop):
  FakeGenerators([-1], image_error=stop).install(monkeypatch)
  lines = [{"id": "t2i", "parts": [{"text": "a red"}], "generate": "image"},
           {"id": "txt0", "parts": [{"text": "a red"}], "generate": "text"},
           {"id": "txt1", "parts": [{"text": "a blue"}], "generate": "text"},
           {"id": "bad", "parts": [], "generate": "audio"},
           {"id": "txt2", "parts": [{"text": "a"}], "generate": "text"}]
  out_dir = tmp_path / "out"
  with pytest.raises(stop):
    run(model, write_lines(tmp_path / "r.jsonl", lines), out_dir, batch_size=2)
  rows = manifest(out_dir)  # in completion order: the parse error, then the text batches
  assert [(r["id"], r["line"]) for r in rows] == [("bad", 4), ("txt0", 2), ("txt1", 3), ("txt2", 5)]
  assert "error" in rows[0] and all("text" in r for r in rows[1:])


def test_requests_file_that_is_empty_missing_or_a_directory(model, tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_bytes(b"\n  \n")
  rows = run(model, str(empty), tmp_path / "out")
  assert rows == [] and manifest(tmp_path / "out") == [] and requests.exit_code(rows) == 0
  with pytest.raises(IsADirectoryError, match=f"--prompts='{tmp_path}' is a directory"):
    requests.parse_requests(str(tmp_path), IMAGE_SHAPE)
  with pytest.raises(FileNotFoundError, match="nope.jsonl'?: no such file"):
    requests.parse_requests(str(tmp_path / "nope.jsonl"), IMAGE_SHAPE)


@contextlib.contextmanager
def parsed_flags(argv):
  """The CLI's flags parsed from `argv`, put back as they were (unparsed) afterwards."""
  was_parsed = flags.FLAGS.is_parsed()
  with flagsaver.flagsaver():
    flags.FLAGS(["unimm", *argv])
    try:
      yield
    finally:
      if not was_parsed:
        flags.FLAGS.unparse_flags()


def test_sample_mode_exit_status_says_whether_a_request_failed(model, tmp_path, monkeypatch):
  task, params, tok = model
  monkeypatch.setattr(main, "load_trained", lambda config, workdir, ema=True: (task, params, tok, 1))
  monkeypatch.setattr(main.console, "setup", lambda *a: None)  # no log file added to this process's logging
  FakeGenerators([-1]).install(monkeypatch)
  good = {"id": "ok", "parts": [{"text": "a red"}], "generate": "text", "max_tokens": 2}
  common = ["--config=configs/transfusion/tiny.py", f"--workdir={tmp_path}", f"--out={tmp_path / 'out'}"]
  for lines, status in (([good], 0), ([good, b"\xff"], requests.SOME_FAILED)):
    with parsed_flags(["--mode=sample", f"--prompts={write_lines(tmp_path / 'r.jsonl', lines)}", *common]):
      assert main.main([]) == status  # app.run exits with it
    assert len(manifest(tmp_path / "out")) == len(lines)
  with parsed_flags(["--mode=sample", f"--prompts={tmp_path}", *common]):
    with pytest.raises(app.UsageError, match="is a directory"):
      main.main([])
  with parsed_flags(["--mode=sample", f"--prompts={tmp_path / 'r.jsonl'}", "--images_per_prompt=0", *common]):
    with pytest.raises(app.UsageError, match="--images_per_prompt=0; expected 1 or more"):
      main.main([])
  monkeypatch.setattr(main, "evaluate", lambda config, workdir: {})
  with parsed_flags(["--mode=eval", *common]):
    assert main.main([]) is None


def write_prepared(path, records_bytes):
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for r in records_bytes:
    writer.write(r)
  writer.close()


def test_eval_data_skips_and_counts_bad_records(tmp_path, monkeypatch):
  shape = (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3)
  scenes = [shapes.sample_scene(np.random.default_rng(k)) for k in range(3)]
  want = [shapes.caption(objects) for _, objects in scenes]

  def pair(caption, pixels):
    return records.encode_document([{"text": caption}, {"image": records.encode_image(pixels)}], is_pair=True)

  good = [pair(caption, pixels) for caption, (pixels, _) in zip(want, scenes)]
  write_prepared(tmp_path / "test.array_record", [
      good[0], b"not msgpack",  # corrupt
      pair(want[0], np.zeros((16, 16, 3), np.uint8)),  # bad_image: the model's images are 32×32
      pair(want[0], np.zeros((*shape[:2], 1), np.uint8)),  # bad_image: one channel, not three
      records.encode_document([{"text": b"caf\xe9"}]),  # bad_text
      good[1], records.encode_document([{"text": "text only"}]), good[2]])
  spec = {"kind": "prepared", "path": str(tmp_path / "{split}.array_record")}
  captions, images, skipped = evaluate.load_pairs(spec, "test", "", 10, shape)
  assert captions == want and np.array_equal(images, np.stack([pixels for pixels, _ in scenes]))
  assert skipped == {**dict.fromkeys(documents.SKIP_REASONS, 0), "corrupt": 1, "bad_image": 2, "bad_text": 1}
  assert evaluate.load_pairs(spec, "test", "", 2, shape)[0] == want[:2]  # `limit` usable pairs, past the bad ones

  # evaluate() reports the counts in eval.json, and a split with no usable pair scores nothing but does not crash.
  write_prepared(tmp_path / "bad.array_record", [b"junk"])
  config = ml_collections.ConfigDict({
      "model": {"family": "transfusion"},
      "data": {"data_dir": "", "image_size": shape[0], "image_channels": 3, "sources": {
          "a": {**spec, "tfds_name": "shapes"}, "b": {"kind": "prepared", "tfds_name": "shapes",
                                                         "path": str(tmp_path / "bad.array_record")}}}})
  monkeypatch.setattr(evaluate, "perplexity", lambda *a: 1.0)
  monkeypatch.setattr(placement.Placement, "from_config", lambda config: None)
  FakeGenerators([-1]).install(monkeypatch)
  monkeypatch.setattr(FakeGenerators, "generate", lambda self, prompts, rng=None, **kw: (
      [[7, 2]] * len(prompts) if "max_new_tokens" in kw else np.zeros((len(prompts), *shape), np.uint8)))
  tok = type("Tok", (), {"specials": tokenizer_lib.SpecialIds(0, 1, 2, 3, 4, 5, ()), "encode": lambda s, t: [9],
                          "decode": lambda s, ids: "x"})()
  task = type("Task", (), {"model": type("M", (), {"slots": 4})()})()
  results = evaluate.evaluate(config, task, None, tok, num_examples=10, diffusion_steps=1)
  assert results["a"]["examples"] == 3 and results["a"]["skipped"] == skipped
  assert results["b"] == {"examples": 0, "skipped": {**dict.fromkeys(documents.SKIP_REASONS, 0), "corrupt": 1}}
  assert "a/skipped/bad_image" in evaluate.flatten(results)
