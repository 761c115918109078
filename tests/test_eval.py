"""Evaluation: scorers against references (real data must score perfectly), and the eval command."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import REPO
from unimm.data import digits, shapes
from unimm.eval import evaluate


def test_shapes_scorers_on_real_data_are_perfect_and_on_wrong_data_fail():
  rng = np.random.default_rng(0)
  scenes = [shapes.sample_scene(rng) for _ in range(60)]
  images = np.stack([s[0] for s in scenes])
  captions = [shapes.caption(s[1]) for s in scenes]
  assert set(evaluate.score_shapes_images(images, captions).values()) == {1.0}
  assert set(evaluate.score_shapes_captions(captions, captions).values()) == {1.0}
  shuffled = captions[1:] + captions[:1]
  assert evaluate.score_shapes_images(images, shuffled)["accuracy"] < 0.2
  assert evaluate.score_shapes_captions(["a red thing"] * 60, captions)["parsable"] == 0.0
  # One object recoloured: colour accuracy drops, shape and position stay.
  first = scenes[0][1][0]
  other = next(c for c in shapes.COLOR_NAMES if c != first.color)
  wrong = captions[0].replace(f"a {first.color} {first.shape}", f"a {other} {first.shape}", 1)
  one = evaluate.score_shapes_captions([wrong], [captions[0]])
  assert one["exact_match"] == 0 and one["colour_accuracy"] < 1 and one["shape_accuracy"] == 1
  assert one["position_accuracy"] == 1 and one["count_accuracy"] == 1


def test_digit_scorers(data_dir):
  train = tfds.data_source("digits", split="train", data_dir=data_dir)
  test = tfds.data_source("digits", split="test", data_dir=data_dir)
  clf = evaluate.digit_classifier(np.stack([train[i]["image"] for i in range(len(train))]),
                                  np.array([int(train[i]["label"]) for i in range(len(train))]))
  images = np.stack([test[i]["image"] for i in range(len(test))])
  labels = np.array([int(test[i]["label"]) for i in range(len(test))])
  assert evaluate.score_digit_images(images, labels, clf)["accuracy"] > 0.9
  assert evaluate.score_digit_images(images, (labels + 1) % 10, clf)["accuracy"] < 0.1
  texts = [digits.caption(int(l)) for l in labels]
  assert evaluate.score_digit_captions(texts, labels) == {"accuracy": 1.0, "parsable": 1.0}


@pytest.mark.slow
def test_eval_command_writes_eval_json(data_dir, tmp_path):
  from test_train_loop import command
  workdir = str(tmp_path / "run")
  out = subprocess.run(command(data_dir, workdir, "--config.train.num_steps=2"), cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  cmd = [sys.executable, "-m", "unimm.main", "--mode=eval", "--eval_examples=6", "--diffusion_steps=3",
         *command(data_dir, workdir)[3:]]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.load(open(os.path.join(workdir, "eval.json")))
  assert result["step"] == 2 and result["shapes"]["examples"] == 6
  assert 1.0 < result["text"]["perplexity"] < 1e4
  for part in ("text_to_image", "image_to_text"):
    for v in result["shapes"][part].values():
      assert 0.0 <= v <= 1.0
  assert os.listdir(os.path.join(workdir, "tensorboard", "eval"))
