"""The CLI's data modes, as the README runs them (in a subprocess, like a user)."""

import json
import os
import subprocess
import sys

from PIL import Image

from conftest import REPO


def test_inspect_mode_prints_checked_rows(data_dir, tmp_path):
  env = {**os.environ, "UNIMM_DATA_DIR": data_dir}
  cmd = [sys.executable, "-m", "unimm.main", "--mode=inspect", "--config=configs/transfusion/tiny.py",
         f"--workdir={tmp_path}", "--config.data.sources.shapes.builder_config=small",
         "--config.data.seq_len=512", "--config.data.max_images_per_row=16", "--num_batches=2"]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout[out.stdout.index("\n{") + 1:])
  assert summary["batch_shape"] == [16, 512]
  assert summary["fill_ratio"] > 0.85 and summary["documents_per_row"] > 5
  assert "doc 1 (" in out.stdout and "(read): 16 slots" in out.stdout  # the demo's 8×8 patches: 16 an image
  grid = Image.open(summary["images_png"])
  assert grid.size[0] == 8 * 64 + 7 * 2  # 8 images a row, 32 px upscaled ×2, 2 px gaps


def test_bad_override_fails_with_a_clear_message(tmp_path):
  cmd = [sys.executable, "-m", "unimm.main", "--config=configs/transfusion/tiny.py", f"--workdir={tmp_path}",
         "--config.data.no_such_key=1"]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and "no_such_key" in out.stderr
