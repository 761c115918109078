"""transformers' Chameleon → a unimm Chameleon workdir (its LM over unimm's joint vocabulary, its VQGAN as
the frozen tokenizer), judged by transformers' ChameleonForConditionalGeneration: logits on mixed text +
image-token sequences, greedy text generation, and the round trip back to Hugging Face."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hf_reference  # noqa: E402
from unimm import families, main  # noqa: E402
from unimm.convert import safetensors_io, workdir as convert_workdir  # noqa: E402
from unimm.data import packed, pipeline  # noqa: E402
from unimm.inference import prompts as prompts_lib  # noqa: E402
from unimm.train import config_record  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
VOCAB = 384
TOKENIZER_IDS = 346  # the tiny tokenizer's 330 pieces and specials, then unimm's 16 reserved ids
# PAD, EOI, IMG and padding, which unimm never samples as text, and BOI, which would start an image (ours
# draws it, transformers' generate writes text on): zero head rows keep the greedy comparison to text.
NEVER_TEXT = [2, 3, 4, 5, *range(TOKENIZER_IDS, VOCAB)]


@pytest.fixture(scope="module")
def chameleon(tmp_path_factory):
  root = tmp_path_factory.mktemp("chameleon")
  source, workdir = str(root / "hf"), str(root / "workdir")
  model, _, code_ids = hf_reference.tiny_chameleon(source, vocab_size=VOCAB, silent=NEVER_TEXT)
  summary = convert_workdir.import_any(source, workdir, seq_len=256)
  assert summary["model_type"] == "chameleon" and summary["codes"] == 64 and summary["tokenizer"]
  config = config_record.load_config(workdir)
  config.model.backbone.dtype = "float32"
  tokenizer = pipeline.load_tokenizer(config.data)
  assert tokenizer.vocab_size == TOKENIZER_IDS and tuple(config.model.image_token_range) == (6, 70)
  assert (tokenizer.specials.boi, tokenizer.specials.eoi, tokenizer.specials.img) == (3, 4, 5)  # Chameleon's own
  task = families.build_task(config, tokenizer.vocab_size, frozen_codec=families.load_frozen_codec(config))
  return model, code_ids, source, workdir, task, main.starting_params(config, task), tokenizer


def test_logits_on_mixed_text_and_image_tokens(chameleon):
  """Text ids score as transformers' (which rules image tokens out of its text logits), each code at
  text_vocab + c as the checkpoint's head row of its BPE id."""
  model, code_ids, _, _, task, params, _ = chameleon
  codes = np.random.default_rng(0).integers(0, 64, 16)
  text, after = [0, 100, 120, 3], [4, 130, 140]
  bpe = text + [code_ids[int(c)] for c in codes] + after
  with torch.no_grad():
    masked = model(torch.tensor([bpe])).logits[0].numpy()
    raw = model.lm_head(model.model(torch.tensor([bpe])).last_hidden_state)[0].numpy()
  tokens = text + [VOCAB + int(c) for c in codes] + after
  t = len(tokens)
  rows = packed.Rows(jnp.array([tokens]), jnp.arange(t)[None], jnp.ones((1, t), jnp.int32),
                     jnp.array([[0] * 4 + [1] * 16 + [0] * 3]))
  ours = np.asarray(task.model.apply({"params": params}, rows)[0])
  text_ids = np.setdiff1d(np.arange(VOCAB), list(code_ids.values()))
  assert np.abs(ours[:, text_ids] - masked[:, text_ids]).max() <= TOL
  assert np.abs(ours[:, VOCAB:] - raw[:, [code_ids[c] for c in range(64)]]).max() <= TOL


def test_greedy_text_generation_equals_generate(chameleon):
  model, _, _, _, task, params, tokenizer = chameleon
  generator = families.code_text_generator(task, params, tokenizer.specials)
  prompts = [[0, 100, 120], [0, 7, 300, 250, 90], [0]]
  got = generator.generate([prompts_lib.Prompt(p, [0] * len(p), []) for p in prompts], max_new_tokens=12,
                           rng=jax.random.key(0))
  for prompt, ours in zip(prompts, got):
    with torch.no_grad():
      reference = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                 pad_token_id=2)[0, len(prompt):].tolist()
    assert list(ours)[:len(reference)] == reference, (list(ours), reference)


def test_export_round_trip_gives_the_same_tensors(chameleon, tmp_path):
  _, _, source, workdir, _, _, _ = chameleon
  out = tmp_path / "exported"
  proc = subprocess.run([sys.executable, "-m", "unimm.convert", "--to_hf", f"--workdir={workdir}", f"--out={out}"],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  a, b = safetensors_io.CheckpointReader(source), safetensors_io.CheckpointReader(str(out))
  assert sorted(a.keys()) == sorted(b.keys())
  for name in a.keys():
    np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)
  reloaded = transformers.ChameleonForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32)
  assert json.loads((out / "config.json").read_text())["vocabulary_map"] == reloaded.config.vocabulary_map


@pytest.mark.slow
def test_a_converted_chameleon_trains_then_exports(tmp_path):
  """Into the tiny recipe (shapes data), three steps on the workdir alone, export: transformers' logits of the
  export are what `--mode=score` computes on the trained workdir."""
  source, workdir = str(tmp_path / "hf"), str(tmp_path / "workdir")
  hf_reference.tiny_chameleon(source, seed=3, vocab_size=VOCAB, swin=True)

  out = tmp_path / "exported"
  hf_reference.convert_train_export(source, workdir, "configs/chameleon/tiny.py", str(out))
  seq = [0, 90, 133, 120, 75]  # text ids (6..69 are image tokens: unimm writes them as codes)
  (tmp_path / "score.jsonl").write_text(json.dumps({"id": "s", "token_ids": seq}) + "\n")
  hf_reference.run_module("unimm.main", "--mode=score", f"--workdir={workdir}", f"--inputs={tmp_path / 'score.jsonl'}",
                          f"--out={tmp_path / 'o'}")
  trained = np.load(tmp_path / "o" / "s.npy")
  text_ids = np.r_[0:6, 70:VOCAB]
  exported = transformers.ChameleonForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
  original = transformers.ChameleonForConditionalGeneration.from_pretrained(source, dtype=torch.float32).eval()
  with torch.no_grad():
    after, before = (m(torch.tensor([seq])).logits[0].numpy()[:, text_ids] for m in (exported, original))
  assert np.abs(trained[:, text_ids] - after).max() <= TOL
  assert np.abs(trained[:, text_ids] - before).max() > 100 * TOL  # training moved the weights
