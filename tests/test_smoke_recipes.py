"""The paper recipes end to end, in miniature (their `smoke` variants), through the real CLI path.

Per family: a tokenizer trained by the run's prepare step, the codec it needs trained for a few steps through
its own config (shared fixtures: `shapes_vae`, `shapes_vq`, a SigLIP run here), 24 training steps with
finite losses that fall (the last 5 steps' mean below the first 5's), a checkpoint, SIGTERM and a resume
(losses equal to the ones an uninterrupted run logs after it), then `--mode=sample` and `--mode=eval`.
Transfusion 7B, Chameleon-7B, Janus-Pro-7B stages I → II → III through `train.init_from`.
"""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from conftest import REPO, SHAPES_VAE_OVERRIDES, optimized_xla_env
from unimm.train import config_record
from test_train_loop import wait_for_step

pytestmark = pytest.mark.slow

SOURCES = {"transfusion": ("text", "image_caption"), "chameleon": ("text", "image_text", "interleaved"),
           "janus": ("generation", "understanding", "text")}


def cli(config: str, family: str, data_dir: str, workdir: str, *extra) -> list[str]:
  return [sys.executable, "-m", "unimm.main", f"--config={config}", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}",
          *[f"--config.data.sources.{s}.builder_config=small" for s in SOURCES[family]], *extra]


# Launches that train (dozens of steps) compile at XLA's level 1, the rest (compile-bound) at the suite's 0.
TRAINING_ENV = optimized_xla_env(level=1)


def run(cmd, ok=True, timeout=600, env=None):
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
  if ok:
    assert out.returncode == 0, out.stderr[-4000:]
  return out


def step_losses(workdir) -> dict[int, dict]:
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r for r in rows if "loss" in r}


def train_preempt_resume(cmd, workdir) -> dict[int, dict]:
  """Trains `cmd` (a 24-step smoke run), SIGTERMs it after step 6 (it saves and exits 0), resumes it to the
  end; checks the losses are finite and fall; returns the per-step metrics."""
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=TRAINING_ENV)
  wait_for_step(workdir, 6, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0 and "SIGTERM" in err, err[-3000:]
  preempted = max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert 6 <= preempted < 24
  out = run(cmd, env=TRAINING_ENV)
  assert f"Resumed from step {preempted}" in out.stderr
  losses = step_losses(workdir)
  assert sorted(losses) == list(range(1, 25))
  values = np.array([losses[s]["loss"] for s in range(1, 25)])
  assert np.isfinite(values).all() and values[-5:].mean() < values[:5].mean(), values
  return losses


def write_requests(tmp_path, requests) -> str:
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "i.png")
  path = tmp_path / "prompts.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in requests) + "\n")
  return str(path)


T2I = {"id": "t2i", "parts": [{"text": "a red circle at the top left"}], "generate": "image"}
CAPTION = {"id": "cap", "parts": [{"image": "i.png"}], "generate": "text", "max_tokens": 8}


def sample_and_eval(cmd, tmp_path, workdir, requests, *sample_flags) -> tuple[dict, dict]:
  run([*cmd, "--mode=sample", f"--prompts={write_requests(tmp_path, requests)}", f"--out={tmp_path / 'out'}",
       *sample_flags])
  by_id = {r["id"]: r for r in map(json.loads, open(tmp_path / "out" / "manifest.jsonl"))}
  assert not any("error" in r for r in by_id.values()), by_id
  for name in [by_id["t2i"]["image"], *by_id["t2i"].get("images", [])]:
    im = Image.open(tmp_path / "out" / name)
    assert im.size == (32, 32) and im.mode == "RGB"
  assert isinstance(by_id["cap"]["text"], str)
  run([*cmd, "--mode=eval", "--eval_examples=4", "--diffusion_steps=4"])
  ev = json.load(open(os.path.join(workdir, "eval.json")))
  assert np.isfinite(ev["text"]["perplexity"]) and ev["step"] == 24
  return by_id, ev


@pytest.mark.xdist_group("shapes_vae")
def test_transfusion_7b_smoke(data_dir, shapes_vae, tmp_path):
  """Llama-like tokenizer (specials appended), a KL-VAE's latents with its stored scale, text : image–caption
  tokens 1:1, bf16, scan, remat "auto", AdamW with decay on kernels only."""
  workdir = str(tmp_path / "transfusion")
  cmd = cli("configs/transfusion/7b.py:smoke", "transfusion", data_dir, workdir,
            f"--config.model.autoencoder.checkpoint={shapes_vae}/checkpoints", *SHAPES_VAE_OVERRIDES)
  # Pinned to the pieces (as 32,000 for Llama's): a clear error at start-up, not NaN at step 1. (The run
  # prepares first: it trains the tokenizer.)
  bad = run([*cmd, "--config.model.vocab_size=128", f"--workdir={tmp_path / 'bad'}"], ok=False)
  from unimm.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.Tokenizer.load(os.path.join(data_dir, "tokenizers", "shapes_appended_bpe128.model"))
  pieces = tok._sp.get_piece_size()  # pylint: disable=protected-access
  assert tok.vocab_size == pieces + 20 and tok.specials.boi >= pieces  # appended, as for Llama's tokenizer
  assert bad.returncode != 0
  assert (f"vocab_size=128 is smaller than the tokenizer's {tok.vocab_size} ids" in bad.stderr
          and "--config.model.vocab_size=256" in bad.stderr), bad.stderr[-2000:]
  assert not os.path.exists(tmp_path / "bad" / "checkpoints")

  losses = train_preempt_resume(cmd, workdir)
  assert all(np.isfinite(losses[s]["diffusion_loss"]) and losses[s]["lm_loss"] > 0 for s in losses)
  config = config_record.load_config(workdir)
  assert config["model"]["backbone"]["remat"] == "auto" and config["data"]["mix_by"] == "tokens"
  by_id, ev = sample_and_eval(cmd, tmp_path, workdir, [T2I, CAPTION], "--diffusion_steps=4")
  assert ev["image_caption"]["examples"] == 4 and 0 <= ev["image_caption"]["text_to_image"]["accuracy"] <= 1


@pytest.mark.xdist_group("shapes_vq")
def test_chameleon_7b_smoke(data_dir, shapes_vq, tmp_path):
  """VQ codes in the vocabulary, QK-norm, dropout 0.1, z-loss, causal images, text : image–text : interleaved
  tokens 2.9 : 1.5 : 0.4; sampling with constrained decoding, guidance and images drawn mid-text."""
  workdir = str(tmp_path / "chameleon")
  cmd = cli("configs/chameleon/7b.py:smoke", "chameleon", data_dir, workdir,
            f"--config.model.vq.checkpoint={shapes_vq}/checkpoints")
  losses = train_preempt_resume(cmd, workdir)
  assert all(losses[s]["image_loss"] > 0 and losses[s]["z_loss"] > 0 for s in losses)
  mixed = {"id": "mixed", "parts": [{"text": "a blue"}], "generate": "text", "max_tokens": 70}
  by_id, ev = sample_and_eval(cmd, tmp_path, workdir, [T2I, CAPTION, mixed], "--temperature=1.0")
  assert isinstance(by_id["mixed"]["text"], str)
  for name in by_id["mixed"].get("images", []):  # images the model chose to draw mid-text
    assert Image.open(tmp_path / "out" / name).size == (32, 32)
  assert ev["image_text"]["examples"] == 4 and 0 <= ev["image_text"]["text_to_image"]["accuracy"] <= 1


VIT = ["--config.model.vision.width=16", "--config.model.vision.depth=1", "--config.model.vision.num_heads=2",
       "--config.model.vision.mlp_dim=32"]


def params_of(workdir):
  from unimm.train import checkpoint  # pylint: disable=g-import-not-at-top
  restored = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False).restore_params()
  return traverse_util.flatten_dict(jax.tree.map(np.asarray, restored), sep="/")


@pytest.mark.xdist_group("shapes_vq")
def test_janus_pro_7b_smoke_stages(data_dir, shapes_vq, tmp_path):
  """SigLIP pretraining, then stages I → II → III through init_from: what each stage trains, the hand-off,
  then sample (several images per prompt) and eval on stage III."""
  siglip = str(tmp_path / "siglip")
  run([sys.executable, "-m", "unimm.main", "--config=configs/siglip/tiny.py:shapes", f"--workdir={siglip}",
       f"--config.data.data_dir={data_dir}", "--config.data.sources.shapes.builder_config=small", *VIT,
       "--config.model.siglip_text.num_layers=1", "--config.model.siglip_text.dim=16",
       "--config.model.siglip_text.num_heads=2", "--config.model.siglip_text.mlp_hidden=32",
       "--config.data.batch_size=4", "--config.train.num_steps=2", "--config.train.log_every=1",
       "--config.train.final_eval_examples=20"])
  zero_shot = json.load(open(os.path.join(siglip, "eval.json")))["zero_shot"]["shapes"]
  assert zero_shot["examples"] == 20 and 0 <= zero_shot["image_to_text_accuracy"] <= 1

  def stage_cmd(n, *extra):
    return cli(f"configs/janus/pro_7b.py:stage{n}_smoke", "janus", data_dir, str(tmp_path / f"stage{n}"),
               f"--config.model.vision.checkpoint={siglip}/checkpoints",
               f"--config.model.vq.checkpoint={shapes_vq}/checkpoints", *VIT, *extra)

  run(stage_cmd(1), env=TRAINING_ENV)
  run(stage_cmd(2, f"--config.train.init_from={tmp_path / 'stage1'}/checkpoints"), env=TRAINING_ENV)
  cmd3 = stage_cmd(3, f"--config.train.init_from={tmp_path / 'stage2'}/checkpoints")
  losses3 = train_preempt_resume(cmd3, str(tmp_path / "stage3"))
  assert all(losses3[s]["image_loss"] > 0 for s in losses3)
  for n in (1, 2):
    values = np.array([step_losses(tmp_path / f"stage{n}")[s]["loss"] for s in range(1, 25)])
    assert np.isfinite(values).all() and values[-5:].mean() < values[:5].mean(), (n, values)

  vit = {k: v for k, v in params_of(siglip).items() if k.startswith("image_encoder/")}
  p1, p2, p3 = (params_of(tmp_path / f"stage{n}") for n in (1, 2, 3))
  # Stage I: the ViT is SigLIP's and stays frozen (also in II); the LLM stays at its init; III trains the ViT.
  for k, v in vit.items():
    name = k.replace("image_encoder/", "vision_encoder/")
    np.testing.assert_array_equal(p1[name], v)
    np.testing.assert_array_equal(p2[name], v)
  assert any(not np.array_equal(p3[k], p2[k]) for k in p3 if k.startswith("vision_encoder/"))
  assert any(not np.array_equal(p1[k], p2[k]) for k in p1 if k.startswith("decoder/"))  # the LLM trains in II

  # The hand-off: a fresh stage II starts from exactly stage I's params.
  from unimm import families  # pylint: disable=g-import-not-at-top
  from unimm.data import pipeline  # pylint: disable=g-import-not-at-top
  from unimm.parallel import sharding  # pylint: disable=g-import-not-at-top
  from unimm.train import loop, setup as setup_lib  # pylint: disable=g-import-not-at-top
  config = config_record.load_config(tmp_path / "stage2")  # as the run resolved it
  mesh = sharding.make_mesh(config.mesh)
  setup = setup_lib.build(config, mesh, pipeline.load_tokenizer(config.data).vocab_size,
                          families.load_frozen_codec(config))
  # Zeros where a fresh init would put random values: every param must come from stage I's checkpoint.
  fresh = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding), setup.abstract_state.params)
  started = traverse_util.flatten_dict(jax.tree.map(np.asarray, loop.start_params(config, fresh)), sep="/")
  assert started.keys() == p1.keys()
  for k in p1:
    np.testing.assert_array_equal(started[k], p1[k])

  by_id, ev = sample_and_eval(cmd3, tmp_path, str(tmp_path / "stage3"), [T2I, CAPTION], "--images_per_prompt=3")
  assert len(by_id["t2i"]["images"]) == 3 and by_id["t2i"]["image"] == by_id["t2i"]["images"][0]
  assert ev["generation"]["examples"] == 4 and set(ev) >= {"generation", "text"}  # one entry for three views
