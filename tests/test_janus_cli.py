"""Janus through the CLI: SigLIP pretraining, stage I → stage II hand-off, sample and eval commands."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from conftest import REPO

# One xdist worker runs every test of the shapes_vq tokenizer, so it is trained once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("shapes_vq")]

VIT = ["--config.model.vision.width=16", "--config.model.vision.depth=1", "--config.model.vision.num_heads=2",
       "--config.model.vision.mlp_dim=32"]


def run(*args, timeout=600):
  out = subprocess.run([sys.executable, "-m", "unimm.main", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def janus_args(data_dir, workdir, stage, siglip, vq, *extra):
  return [f"--config=configs/janus/tiny.py:stage{stage}", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", *[f"--config.data.sources.{s}.builder_config=small" for s in
                                                   ("shapes", "shapes_understanding", "shapes_text")],
          f"--config.model.vision.checkpoint={siglip}/checkpoints", f"--config.model.vq.checkpoint={vq}/checkpoints",
          "--config.model.backbone.num_layers=1", "--config.model.backbone.dim=32",
          "--config.model.backbone.num_heads=2", "--config.model.backbone.mlp_hidden=64", *VIT,
          "--config.data.batch_size=4", "--config.train.log_every=1", "--config.train.warmup_steps=1",
          "--config.train.num_steps=2", *extra]


def params_of(workdir):
  from unimm.train import checkpoint  # pylint: disable=g-import-not-at-top
  restored = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False).restore_params()
  return traverse_util.flatten_dict(jax.tree.map(np.asarray, restored), sep="/")


def test_siglip_then_janus_stages_sample_and_eval(data_dir, shapes_vq, tmp_path):
  siglip = str(tmp_path / "siglip")
  run("--config=configs/siglip/tiny.py:shapes", f"--workdir={siglip}", f"--config.data.data_dir={data_dir}",
      "--config.data.sources.shapes.builder_config=small", *VIT, "--config.model.siglip_text.num_layers=1",
      "--config.model.siglip_text.dim=16", "--config.model.siglip_text.num_heads=2",
      "--config.model.siglip_text.mlp_hidden=32", "--config.data.batch_size=4", "--config.train.num_steps=2",
      "--config.train.log_every=1", "--config.train.final_eval_examples=20")
  zero_shot = json.load(open(os.path.join(siglip, "eval.json")))["zero_shot"]["shapes"]
  assert zero_shot["examples"] == 20 and 0 <= zero_shot["image_to_text_accuracy"] <= 1
  losses = [json.loads(line)["siglip_loss"] for line in open(os.path.join(siglip, "metrics.jsonl"))]
  assert len(losses) == 2 and all(np.isfinite(losses))

  stage1, stage2 = str(tmp_path / "stage1"), str(tmp_path / "stage2")
  run(*janus_args(data_dir, stage1, 1, siglip, shapes_vq))
  run(*janus_args(data_dir, stage2, 2, siglip, shapes_vq, f"--config.train.init_from={stage1}/checkpoints",
                  "--config.train.final_eval_examples=4"))
  vit = {k: v for k, v in params_of(siglip).items() if k.startswith("image_encoder/")}
  p1, p2 = params_of(stage1), params_of(stage2)
  # Stage I: the ViT is SigLIP's and stayed frozen; the LLM stayed at its init; the adaptors trained.
  for k, v in vit.items():
    np.testing.assert_array_equal(p1[k.replace("image_encoder/", "vision_encoder/")], v)
    np.testing.assert_array_equal(p2[k.replace("image_encoder/", "vision_encoder/")], v)  # frozen in II too
  assert any(not np.array_equal(p1[k], p2[k]) for k in p1 if k.startswith("decoder/"))  # the LLM trains in II

  # The hand-off: a fresh stage II starts from exactly stage I's params.
  from unimm.data import pipeline  # pylint: disable=g-import-not-at-top
  from unimm.parallel import sharding  # pylint: disable=g-import-not-at-top
  from unimm.train import loop, setup as setup_lib  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(json.load(open(os.path.join(stage2, "config.json"))))  # as the run resolved it
  mesh = sharding.make_mesh(config.mesh)
  setup = setup_lib.build(config, mesh, pipeline.load_tokenizer(config.data).vocab_size,
                          loop.load_frozen_codec(config))
  fresh = setup.init(jax.random.key(0)).params
  started = traverse_util.flatten_dict(jax.tree.map(np.asarray, loop.start_params(config, fresh)), sep="/")
  assert started.keys() == p1.keys()
  for k in p1:
    np.testing.assert_array_equal(started[k], p1[k])

  ev = json.load(open(os.path.join(stage2, "eval.json")))
  assert ev["shapes"]["examples"] == 4 and set(ev) >= {"shapes", "text"}  # one entry for the three shapes views
  assert "shapes_understanding" not in ev and np.isfinite(ev["text"]["perplexity"])

  Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "i.png")
  requests = [{"id": "t2i", "parts": [{"text": "a red circle at the top left"}], "generate": "image"},
              {"id": "cap", "parts": [{"image": "i.png"}], "generate": "text", "max_tokens": 8}]
  (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in requests) + "\n")
  run(*janus_args(data_dir, stage2, 2, siglip, shapes_vq), "--mode=sample", f"--prompts={tmp_path / 'prompts.jsonl'}",
      f"--out={tmp_path / 'out'}", "--images_per_prompt=3")
  by_id = {r["id"]: r for r in map(json.loads, open(tmp_path / "out" / "manifest.jsonl"))}
  assert len(by_id["t2i"]["images"]) == 3 and by_id["t2i"]["image"] == by_id["t2i"]["images"][0]
  for name in by_id["t2i"]["images"]:
    im = Image.open(tmp_path / "out" / name)
    assert im.size == (32, 32) and im.mode == "RGB"
  assert isinstance(by_id["cap"]["text"], str)
