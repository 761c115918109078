"""Chameleon through the same commands as Transfusion: train (on a trained tokenizer's codes), sample, eval."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

# One xdist worker runs every test of the shapes_vq tokenizer, so it is trained once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("shapes_vq")]


def command(data_dir, workdir, vq_workdir, *args):
  return [sys.executable, "-m", "unimm.main", "--config=configs/chameleon/tiny.py", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", "--config.data.sources.shapes.builder_config=small",
          f"--config.model.vq.checkpoint={vq_workdir}/checkpoints",
          "--config.model.backbone.num_layers=1", "--config.model.backbone.dim=32",
          "--config.model.backbone.num_heads=2", "--config.model.backbone.mlp_hidden=64",
          "--config.data.batch_size=4", "--config.train.log_every=1", "--config.train.sample_every=4",
          "--config.train.sample_prompts=2", "--config.train.warmup_steps=2", *args]


def test_chameleon_trains_samples_and_evaluates(data_dir, shapes_vq, tmp_path):
  workdir = str(tmp_path / "chameleon")
  out = subprocess.run(command(data_dir, workdir, shapes_vq, "--config.train.num_steps=8",
                               "--config.train.final_eval_examples=4"),
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  losses = [r for r in rows if "loss" in r]
  assert losses[-1]["step"] == 8 and all(np.isfinite(r["image_loss"]) and r["image_loss"] > 0 for r in losses)
  assert losses[-1]["loss"] < losses[0]["loss"]
  grid = Image.open(os.path.join(workdir, "samples", "step_0000008.png"))
  assert grid.size[0] > 64  # two sampled 32×32 images, upscaled
  with open(os.path.join(workdir, "eval.json")) as f:
    ev = json.load(f)
  assert ev["shapes"]["examples"] == 4 and 0 <= ev["shapes"]["text_to_image"]["accuracy"] <= 1
  assert np.isfinite(ev["text"]["perplexity"])

  Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "i.png")
  requests = [{"id": "t2i", "parts": [{"text": "a red circle at the top left"}], "generate": "image"},
              {"id": "cap", "parts": [{"image": "i.png"}], "generate": "text", "max_tokens": 8},
              {"id": "mixed", "parts": [{"text": "a blue"}], "generate": "text", "max_tokens": 70}]
  (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in requests) + "\n")
  cmd = command(data_dir, workdir, shapes_vq, "--mode=sample", f"--prompts={tmp_path / 'prompts.jsonl'}",
                f"--out={tmp_path / 'out'}", "--temperature=1.0")
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  by_id = {r["id"]: r for r in map(json.loads, open(tmp_path / "out" / "manifest.jsonl"))}
  im = Image.open(tmp_path / "out" / by_id["t2i"]["image"])
  assert im.size == (32, 32) and im.mode == "RGB"
  assert isinstance(by_id["cap"]["text"], str) and isinstance(by_id["mixed"]["text"], str)
  for name in by_id["mixed"].get("images", []):  # images the model chose to draw mid-text
    assert Image.open(tmp_path / "out" / name).size == (32, 32)
