"""`python -m unimm.convert` workdirs: scored, trained and exported by the commands, judged by transformers."""

import json
import os
import subprocess
import sys

from flax import traverse_util
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hf_reference  # noqa: E402
from unimm.convert import safetensors_io, workdir as convert_workdir  # noqa: E402
from unimm.train import config_record  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


def _run(*args):
  """`python -m unimm.main ARGS` (no --config: the workdir's own) → (exit status, output)."""
  proc = subprocess.run([sys.executable, "-m", "unimm.main", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=600)
  return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A tiny Llama whose vocabulary (384, padded) holds its tokenizer's ids and unimm's roles, converted."""
  root = tmp_path_factory.mktemp("convert")
  tokenizer = hf_reference.tiny_tokenizer()
  source, workdir = str(root / "hf"), str(root / "workdir")
  hf_reference.tiny_llama(source, 384, tokenizer=tokenizer)
  summary = convert_workdir.import_lm(source, workdir, seq_len=128)
  assert summary["vocab"] == [384, 384] and summary["tokenizer"]
  return root, source, workdir, tokenizer


def test_score_matches_transformers_on_a_workdir_alone(converted):
  root, source, workdir, tokenizer = converted
  ids = [0, 5, 17, 100, 200, 33, 1]
  caption = "a red circle at the top left"
  inputs = root / "score.jsonl"
  inputs.write_text("\n".join([json.dumps({"id": "ids", "token_ids": ids}),
                               json.dumps({"id": "text", "parts": [{"text": caption}]}),
                               json.dumps({"id": "bad", "token_ids": [1, 999]}), "not json"]) + "\n")
  status, log = _run("--mode=score", f"--workdir={workdir}", f"--inputs={inputs}", f"--out={root / 'scores'}")
  assert status == 3, log[-3000:]  # two requests failed, the others ran
  manifest = [json.loads(line) for line in (root / "scores" / "manifest.jsonl").read_text().splitlines()]
  assert [m["id"] for m in manifest] == ["ids", "text", "bad", "line4"]
  assert "outside the model's vocabulary" in manifest[2]["error"] and "not UTF-8 JSON" in manifest[3]["error"]
  text_ids = [tokenizer.bos_token_id, *tokenizer.encode(caption, add_special_tokens=False), tokenizer.eos_token_id]
  for row, seq in zip(manifest[:2], (ids, text_ids)):
    ours, ref = np.load(root / "scores" / row["file"]), hf_reference.logits(source, seq)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (len(seq), 384)
    assert np.abs(ours - ref).max() <= TOL
    log_probs = torch.log_softmax(torch.tensor(ref, dtype=torch.float64), -1).numpy()
    expected = sum(log_probs[t, seq[t + 1]] for t in range(len(seq) - 1))
    assert row["tokens"] == len(seq) - 1 and abs(row["log_likelihood"] - expected) < 1e-3


def test_greedy_text_generation_equals_transformers_generate(tmp_path):
  """The sample command's KV-cached greedy decoding of a converted LM = transformers' `generate`."""
  from unimm.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tokenizer = hf_reference.tiny_tokenizer()
  source, workdir = str(tmp_path / "hf"), str(tmp_path / "workdir")
  tokenizer.save_pretrained(source)
  ids = tokenizer_lib.load(source).vocab_size  # what unimm samples from; the rest is padding
  hf_reference.tiny_llama(source, 384, seed=4, tokenizer=tokenizer, silent_from=ids)
  convert_workdir.import_lm(source, workdir, seq_len=128)
  prompts = ["a red circle at", "the quick brown", "Hello"]
  requests = tmp_path / "prompts.jsonl"
  requests.write_text("".join(json.dumps({"id": str(i), "parts": [{"text": p}], "generate": "text",
                                          "max_tokens": 12}) + "\n" for i, p in enumerate(prompts)))
  status, log = _run("--mode=sample", f"--workdir={workdir}", f"--prompts={requests}", f"--out={tmp_path / 's'}")
  assert status == 0, log[-3000:]
  got = [json.loads(line)["text"] for line in (tmp_path / "s" / "manifest.jsonl").read_text().splitlines()]
  reference = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
  for prompt, text in zip(prompts, got):
    ids = [tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]
    with torch.no_grad():
      out = reference.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert text == tokenizer.decode(out[0, len(ids):], skip_special_tokens=True), prompt


def test_export_gives_back_the_same_checkpoint(converted):
  root, source, workdir, _ = converted
  out = str(root / "exported")
  summary = convert_workdir.export_lm(workdir, out)
  assert summary["vocab"] == 384 and summary["step"] is None
  a, b = safetensors_io.CheckpointReader(source), safetensors_io.CheckpointReader(out)
  assert sorted(a.keys()) == sorted(b.keys())
  for name in a.keys():
    np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)
  assert os.path.exists(os.path.join(out, "tokenizer.json"))
  reloaded = transformers.AutoTokenizer.from_pretrained(out)
  assert reloaded.encode("a blue square") == transformers.AutoTokenizer.from_pretrained(source).encode("a blue square")


def test_a_vocabulary_without_room_grows_by_the_mean_and_exports_its_tokens(tmp_path):
  """256 rows but ~320 tokenizer ids (its 300 pieces and unimm's roles): rows 256.. start at the mean."""
  tokenizer = hf_reference.tiny_tokenizer()
  source, workdir = str(tmp_path / "hf"), str(tmp_path / "workdir")
  hf_reference.tiny_llama(source, 256, seed=1, tokenizer=tokenizer)
  summary = convert_workdir.import_lm(source, workdir, seq_len=128, scan=False)
  ids = summary["vocab"]
  assert ids[0] == 256 and ids[1] == 384
  params, _ = convert_workdir.trained_or_converted_params(config_record.load_config(workdir), workdir)
  embedding = np.asarray(params["embed"]["embedding"])
  np.testing.assert_allclose(embedding[300], embedding[:256].mean(0), rtol=1e-6)
  out = str(tmp_path / "exported")
  exported = convert_workdir.export_lm(workdir, out)
  tokenizer_ids = exported["vocab"]
  assert 256 < tokenizer_ids < 384  # the tokenizer's ids kept, the padding to 384 dropped
  seq = [0, 7, 250, 40]
  np.testing.assert_allclose(hf_reference.logits(out, seq)[:, :256], hf_reference.logits(source, seq), atol=TOL)


def test_export_refuses_what_a_llama_checkpoint_cannot_hold(converted):
  _, _, workdir, _ = converted
  config = config_record.load_config(workdir)
  config.model.backbone.qk_norm = True
  with pytest.raises(ValueError, match=r"\['qk_norm'\].*cannot be written"):
    convert_workdir.export_spec(config, None)


@pytest.mark.slow
def test_transfusion_from_a_pretrained_llm_and_vae_trains_then_exports(tmp_path):
  """The README's path: convert an LLM and a diffusers VAE into the tiny Transfusion config (shapes data),
  check the task's latents are diffusers' (z − shift)·scale, train a few steps on the workdir alone, export
  the trained text model, and check transformers computes what score computes."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import test_convert_vae  # pylint: disable=g-import-not-at-top
  from unimm import families  # pylint: disable=g-import-not-at-top
  tokenizer = hf_reference.tiny_tokenizer()
  source, vae, workdir = str(tmp_path / "hf"), str(tmp_path / "vae"), str(tmp_path / "workdir")
  hf_reference.tiny_llama(source, 384, seed=2, tokenizer=tokenizer)
  reference_vae = test_convert_vae._save(vae)  # pylint: disable=protected-access
  proc = subprocess.run([sys.executable, "-m", "unimm.convert", f"--from_hf={source}", f"--workdir={workdir}",
                         f"--vae={vae}", "--seq_len=256", "--config=configs/transfusion/tiny.py"], cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = config_record.load_config(workdir)
  assert (config.model.autoencoder.layout, config.data.image_slots) == ("diffusers", 4)  # 32 px, VAE /2, the demo's patch 8
  task = families.build_task(config, None, frozen_codec=families.load_frozen_codec(config))
  images = test_convert_vae._images(3)  # pylint: disable=protected-access
  with torch.no_grad():
    mean = reference_vae.encode(test_convert_vae._nchw(images)).latent_dist.mean  # pylint: disable=protected-access
  expected = (mean.permute(0, 2, 3, 1).numpy() - 0.1) * 0.3
  assert np.abs(np.asarray(task.encode_images(images[None]))[0] - expected).max() <= TOL
  status, log = _run(f"--workdir={workdir}", "--config.train.num_steps=3", "--config.train.checkpoint_every=3",
                     "--config.train.final_eval_examples=0", "--config.train.sample_every=0")
  assert status == 0, log[-3000:]
  assert "Started from" in log and "12 of 16 params" in log  # the LM's 12, Transfusion's patch and time fresh
  out = str(tmp_path / "exported")
  exported = convert_workdir.export_lm(workdir, out)
  assert exported["step"] == 3
  layers = safetensors_io.CheckpointReader(os.path.join(out, "unimm_image_layers.safetensors")).keys()
  assert len(layers) == exported["image_layers"] and {n.split("/")[0] for n in layers} == {"patch", "time"}
  vae_back = diffusers.AutoencoderKL.from_pretrained(exported["vae"]).eval()
  for name, value in reference_vae.state_dict().items():
    np.testing.assert_array_equal(vae_back.state_dict()[name].numpy(), value.numpy(), err_msg=name)
  seq = [0, 9, 33, 120, 7]
  inputs = tmp_path / "score.jsonl"
  inputs.write_text(json.dumps({"id": "s", "token_ids": seq}) + "\n")
  status, log = _run("--mode=score", f"--workdir={workdir}", f"--inputs={inputs}", f"--out={tmp_path / 'o'}")
  assert status == 0, log[-3000:]
  trained = np.load(tmp_path / "o" / "s.npy")
  assert np.abs(trained - hf_reference.logits(out, seq)).max() <= TOL
  assert np.abs(trained - hf_reference.logits(source, seq)).max() > 100 * TOL  # training moved the weights


@pytest.mark.slow
def test_a_conversion_sharded_over_8_devices_equals_the_unsharded_one(tmp_path):
  tokenizer = hf_reference.tiny_tokenizer()
  source = str(tmp_path / "hf")
  hf_reference.tiny_llama(source, 384, seed=3, tokenizer=tokenizer)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  proc = subprocess.run([sys.executable, "-m", "unimm.convert", f"--from_hf={source}", f"--workdir={tmp_path / 'w8'}",
                         "--shard", "--config=configs/transfusion/tiny.py", "--config.mesh.data=1",
                         "--config.mesh.fsdp=-1", "--seq_len=256"], cwd=REPO, capture_output=True, text=True,
                        timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  placement = json.loads(proc.stdout.strip().splitlines()[-1])["placement"]
  assert placement == {"devices": 8, "embed/embedding": "P('tensor', 'fsdp')"}  # embed axis over fsdp=8
  convert_workdir.import_lm(source, str(tmp_path / "w1"), seq_len=256, scan=True)
  sharded = convert_workdir.trained_or_converted_params(config_record.load_config(str(tmp_path / "w8")), str(tmp_path / "w8"))[0]
  plain = convert_workdir.trained_or_converted_params(config_record.load_config(str(tmp_path / "w1")), str(tmp_path / "w1"))[0]
  flat_sharded, flat_plain = (traverse_util.flatten_dict(p, sep="/") for p in (sharded, plain))
  assert sorted(flat_sharded) == sorted(flat_plain)
  for path, value in flat_plain.items():
    np.testing.assert_array_equal(np.asarray(flat_sharded[path]), np.asarray(value), err_msg=path)

