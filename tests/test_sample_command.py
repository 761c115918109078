"""`--mode=sample`: the manifest contract, PNGs at the dataset's resolution, bad requests isolated."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from test_train_loop import command

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("trained"))
  out = subprocess.run(command(data_dir, workdir, "--config.train.num_steps=4"), cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


def test_sample_command_writes_the_manifest(data_dir, trained, tmp_path):
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "img.png")
  Image.fromarray(rng.integers(0, 256, (64, 48), dtype=np.uint8)).save(tmp_path / "big.png")  # gray, other size
  requests = [
      {"id": "t2i", "parts": [{"text": "a red circle at the top left"}], "generate": "image"},
      {"id": "cap", "parts": [{"image": "img.png"}], "generate": "text", "max_tokens": 8},
      {"id": "txt", "parts": [{"text": "a blue"}], "generate": "text", "max_tokens": 5},
      {"id": "missing", "parts": [{"image": "nope.png"}], "generate": "text"},
      {"id": "kind", "parts": [{"audio": "x.wav"}], "generate": "text"},
      {"id": "long", "parts": [{"text": "a red circle " * 200}], "generate": "text"},
      {"id": "what", "parts": [{"text": "a"}], "generate": "video"},
      {"id": "t2i/2", "parts": [{"image": "big.png"}, {"text": "and a green square"}], "generate": "image"},
  ]
  path = tmp_path / "prompts.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in requests) + "\n")
  out_dir = tmp_path / "out"
  cmd = [sys.executable, "-m", "unimm.main", "--mode=sample", "--config=configs/transfusion/tiny.py",
         f"--workdir={trained}", f"--prompts={path}", f"--out={out_dir}", "--diffusion_steps=4",
         *[a for a in command(data_dir, trained)[4:] if a.startswith("--config.")]]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 3, out.stderr[-3000:]  # the run completed; some requests have `error` lines
  rows = [json.loads(line) for line in open(out_dir / "manifest.jsonl")]
  assert [r["id"] for r in rows] == [r["id"] for r in requests]
  assert [r["line"] for r in rows] == list(range(1, len(requests) + 1))
  by_id = {r["id"]: r for r in rows}
  assert by_id["t2i"]["prompt"] == "a red circle at the top left" and by_id["t2i"]["generate"] == "image"
  for key in ("t2i", "t2i/2"):
    im = Image.open(out_dir / by_id[key]["image"])
    assert im.size == (32, 32) and im.mode == "RGB"
  assert by_id["t2i"]["image"] != by_id["t2i/2"]["image"] and "/" not in by_id["t2i/2"]["image"]
  assert isinstance(by_id["cap"]["text"], str) and isinstance(by_id["txt"]["text"], str)
  assert "not found" in by_id["missing"]["error"]
  assert "unknown part" in by_id["kind"]["error"]
  assert "exceeds the model's context of 256" in by_id["long"]["error"]
  assert "expected 'image' or 'text'" in by_id["what"]["error"]
  assert sum("error" in r for r in rows) == 4
