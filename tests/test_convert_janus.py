"""transformers' Janus → a unimm Janus workdir, judged by transformers' own JanusForConditionalGeneration:
understanding logits (an image through SigLIP + aligner), generation-head logits over codes, VQ encode and
decode, greedy image codes with classifier-free guidance, and the round trip back to Hugging Face."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hf_reference  # noqa: E402
from unimm import families, main  # noqa: E402
from unimm.convert import workdir as convert_workdir  # noqa: E402
from unimm.data import packed, pipeline  # noqa: E402
from unimm.inference import codes as codes_lib, prompts as prompts_lib  # noqa: E402
from unimm.train import config_record  # noqa: E402

TOL = 1e-4
VOCAB = 384


@pytest.fixture(scope="module")
def janus(tmp_path_factory):
  """(reference model, specials, the converted workdir, its task and params in float32)."""
  root = tmp_path_factory.mktemp("janus")
  source, workdir = str(root / "hf"), str(root / "workdir")
  model, _, ids = hf_reference.tiny_janus(source, vocab_size=VOCAB)
  summary = convert_workdir.import_any(source, workdir, seq_len=128)
  assert summary["model_type"] == "janus" and summary["vocab"] == [VOCAB, VOCAB] and summary["tokenizer"]
  config = config_record.load_config(workdir)
  config.model.backbone.dtype = config.model.vision.dtype = "float32"
  tokenizer = pipeline.load_tokenizer(config.data)
  assert (tokenizer.specials.boi, tokenizer.specials.eoi, tokenizer.specials.img, tokenizer.specials.pad) == (
      ids["boi"], ids["eoi"], ids["img"], ids["pad"])  # Janus's own markers in unimm's roles
  task = families.build_task(config, tokenizer.vocab_size, frozen_codec=families.load_frozen_codec(config))
  return model, ids, workdir, task, main.starting_params(config, task), tokenizer


def _rows(tokens, image_ids):
  t = len(tokens)
  return packed.Rows(tokens=jnp.array([tokens]), positions=jnp.arange(t)[None], segment_ids=jnp.ones((1, t), jnp.int32),
                     image_ids=jnp.array([image_ids]))


def _pixels(images):
  return torch.tensor(images.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)


def test_understanding_logits_with_an_image(janus):
  model, ids, _, task, params, _ = janus
  image = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3)).astype(np.uint8)
  tokens = [ids["bos"], 17, 33, ids["boi"]] + [ids["img"]] * 16 + [ids["eoi"], 40, 41, 42]
  with torch.no_grad():
    reference = model(input_ids=torch.tensor([tokens]), pixel_values=_pixels(image)).logits[0].numpy()
  rows = _rows(tokens, [int(t == ids["img"]) for t in tokens])
  ours = np.asarray(task.model.apply({"params": params}, rows, jnp.asarray(image[:, None]))[0, :, :VOCAB])
  assert np.abs(ours - reference).max() <= TOL


def test_generation_head_logits_over_codes(janus):
  model, ids, _, task, params, _ = janus
  codes = np.random.default_rng(1).integers(0, 64, 16)
  text = [ids["bos"], 17, 33, ids["boi"]]
  with torch.no_grad():
    embeds = torch.cat([model.get_input_embeddings()(torch.tensor([text])),
                        model.prepare_embeddings_for_image_generation(torch.tensor(codes[None]))], 1)
    hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
    reference = model.model.generation_head(hidden)[0].numpy()
  rows = _rows(text + [VOCAB + int(c) for c in codes], [0] * 4 + [1] * 16)
  ours = np.asarray(task.model.apply({"params": params}, rows)[0, :, VOCAB:])
  assert np.abs(ours - reference).max() <= TOL


def test_vq_codes_and_decodes(janus):
  model, _, _, task, _, _ = janus
  images = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
  tokenizer, params = task.codes.tokenizer, task.codes.params
  ours = np.asarray(tokenizer.apply({"params": params}, images, method=tokenizer.encode)).reshape(3, -1)
  with torch.no_grad():
    reference = model.model.vqmodel.encode(_pixels(images)).image_tokens.reshape(3, -1).numpy()
    decoded = model.model.vqmodel.decode(torch.tensor(reference)).permute(0, 2, 3, 1).numpy()
  assert np.array_equal(ours, reference) and len(np.unique(reference)) > 8
  pixels = np.asarray(tokenizer.apply({"params": params}, jnp.asarray(reference.reshape(3, 4, 4)),
                                      method=tokenizer.decode_codes))
  assert np.abs(pixels - decoded).max() <= 1e-4 * max(1.0, np.abs(decoded).max())


def test_greedy_image_codes_with_guidance_equal_generate(janus):
  model, ids, _, task, params, tokenizer = janus
  generator = codes_lib.CodeImageGenerator(task, params, tokenizer.specials,
                                           options=codes_lib.CodeSampling(temperature=0.0))
  texts = [[17, 33, 40], [50, 60, 70, 80, 90], [100]]
  prompts = [prompts_lib.Prompt([ids["bos"]] + t, [0] * (len(t) + 1), []) for t in texts]
  ours = generator.code_tokens(prompts, jax.random.key(0), guidance=4.0) - VOCAB
  settings = transformers.GenerationConfig(do_sample=False, guidance_scale=4.0, bos_token_id=ids["bos"],
                                           pad_token_id=ids["pad"], generation_kwargs={"boi_token_id": ids["boi"]})
  for text, codes in zip(texts, ours):
    prompt = torch.tensor([[ids["bos"]] + text + [ids["boi"]]])
    with torch.no_grad():
      reference = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_mode="image",
                                 generation_config=settings)[0].numpy()
    assert np.array_equal(codes, reference), (codes, reference)
  assert len(np.unique(ours)) > 8


def test_export_round_trip_gives_the_same_tensors_and_logits(janus, tmp_path):
  """HF → unimm → HF (`python -m unimm.convert --to_hf`): every tensor back as it was, and
  `from_pretrained` of the export computes the reference's logits."""
  import subprocess, sys, os  # pylint: disable=g-import-not-at-top,multiple-imports
  from unimm.convert import safetensors_io  # pylint: disable=g-import-not-at-top
  model, ids, workdir, _, _, _ = janus
  out = tmp_path / "exported"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", "unimm.convert", "--to_hf", f"--workdir={workdir}", f"--out={out}"],
                        cwd=repo, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  source = safetensors_io.CheckpointReader(os.path.join(os.path.dirname(workdir), "hf"))
  exported = safetensors_io.CheckpointReader(str(out))
  assert sorted(exported.keys()) == sorted(source.keys())
  for name in source.keys():
    assert np.array_equal(np.asarray(exported.get(name)), np.asarray(source.get(name))), name
  reloaded = transformers.JanusForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
  image = np.random.default_rng(3).integers(0, 256, (1, 32, 32, 3)).astype(np.uint8)
  tokens = torch.tensor([[ids["bos"], 9, ids["boi"]] + [ids["img"]] * 16 + [ids["eoi"], 12]])
  with torch.no_grad():
    a = reloaded(input_ids=tokens, pixel_values=_pixels(image)).logits
    b = model(input_ids=tokens, pixel_values=_pixels(image)).logits
  assert torch.equal(a, b)


@pytest.mark.slow
def test_a_converted_janus_trains_a_stage_then_exports(tmp_path):
  """The README's path: Janus into the tiny recipe's stage II (shapes data), three steps on the workdir
  alone, export; transformers' logits of the export are what `--mode=score` computes on the workdir."""
  import json  # pylint: disable=g-import-not-at-top
  source, workdir = str(tmp_path / "hf"), str(tmp_path / "workdir")
  hf_reference.tiny_janus(source, seed=5, vocab_size=VOCAB)
  out = tmp_path / "exported"
  log = hf_reference.convert_train_export(source, workdir, "configs/janus/tiny.py:stage2", str(out))
  assert "62 of 62 params" in log  # every param from the checkpoint, none fresh
  seq = [0, 9, 33, 120, 7]
  (tmp_path / "score.jsonl").write_text(json.dumps({"id": "s", "token_ids": seq}) + "\n")
  hf_reference.run_module("unimm.main", "--mode=score", f"--workdir={workdir}", f"--inputs={tmp_path / 'score.jsonl'}",
                          f"--out={tmp_path / 'o'}")
  trained = np.load(tmp_path / "o" / "s.npy")
  exported = transformers.JanusForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
  original = transformers.JanusForConditionalGeneration.from_pretrained(source, dtype=torch.float32).eval()
  with torch.no_grad():
    after, before = (m(input_ids=torch.tensor([seq])).logits[0].numpy() for m in (exported, original))
  assert np.abs(trained - after).max() <= TOL
  assert np.abs(trained - before).max() > 100 * TOL  # training moved the weights


def test_export_refuses_what_transformers_janus_cannot_hold(janus):
  """A Janus whose tokenizer is unimm's own layout (e.g. trained here from scratch) is refused by name."""
  from unimm.convert import janus as janus_convert  # pylint: disable=g-import-not-at-top
  config = config_record.load_config(janus[2])
  spec = convert_workdir.export_spec(config, None)
  assert janus_convert.hf_config(config, spec, dtype="float32")["model_type"] == "janus"
  config.model.vq.layout = "unimm"
  config.model.adaptor_gelu_exact = False
  with pytest.raises(ValueError, match=r"model.vq.layout='unimm'.*model.adaptor_gelu_exact=False"):
    janus_convert.hf_config(config, spec, dtype="float32")
