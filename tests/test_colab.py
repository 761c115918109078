"""The evaluation notebook runs headless on a tiny checkpoint the test trains."""

import json
import os
import subprocess

import nbformat
from nbclient import NotebookClient
import pytest

from conftest import REPO
from test_train_loop import command

pytestmark = pytest.mark.slow


def test_evaluate_notebook_runs(data_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  out = subprocess.run(command(data_dir, workdir, "--config.train.num_steps=2"), cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  overrides = [a[len("--config."):] for a in command(data_dir, workdir) if a.startswith("--config.")]
  monkeypatch.setenv("UNIMM_WORKDIR", workdir)
  monkeypatch.setenv("UNIMM_OVERRIDES", ",".join(overrides))
  monkeypatch.setenv("UNIMM_EVAL_EXAMPLES", "4")
  monkeypatch.setenv("UNIMM_DIFFUSION_STEPS", "3")
  nb = nbformat.read(os.path.join(REPO, "colabs", "evaluate.ipynb"), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  assert "checkpoint step 2" in text and "caption: " in text and "text/perplexity" in text
  assert any("image/png" in o.get("data", {}) for o in outputs)  # the grid and the curves are shown
  assert json.load(open(os.path.join(workdir, "eval.json")))["step"] == 2
