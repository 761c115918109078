"""bench/shapes_judge.py: the second-opinion judge reads real scenes right and scores a sample-mode output."""

import json
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import shapes_judge  # noqa: E402

from unimm.data import shapes  # noqa: E402


def test_judge_reads_rendered_scenes():
  rng = np.random.default_rng(3)
  for _ in range(200):
    image, objects = shapes.sample_scene(rng)
    assert shapes_judge.judge(image) == {o.quadrant: (o.color, o.shape) for o in objects}


def test_score_counts_right_wrong_and_failed_requests(tmp_path):
  prompts = str(tmp_path / "prompts.jsonl")
  shapes_judge.write_prompts(prompts, 6, "reversed", seed=0)
  truth = json.load(open(prompts + ".truth.json"))
  lines = [json.loads(line) for line in open(prompts)]
  two = next(r for r in lines if len(truth[r["id"]]) == 2)
  _, second = truth[two["id"]]
  assert two["parts"][0]["text"].startswith(f"a {second[0]} {second[1]} at the {shapes_judge.PLACES[second[2]]}")
  out = tmp_path / "out"
  out.mkdir()
  manifest = []
  for k, record in enumerate(lines):
    if k == 5:  # a failed request: skipped, not scored
      manifest.append({"id": record["id"], "error": "boom"})
      continue
    objects = [shapes.Obj(c, s, q) for c, s, q in truth[record["id"]]]
    if k == 0:  # one image drawn wrong: its first object in another shape
      objects[0] = shapes.Obj(objects[0].color, "triangle" if objects[0].shape == "square" else "square",
                              objects[0].quadrant)
    canvas = np.zeros((32, 32, 3), np.uint8)
    for o in objects:
      shapes.render_object(canvas, o, 11, (0, 0))
    Image.fromarray(canvas).save(out / f"{record['id']}.png")
    manifest.append({"id": record["id"], "image": f"{record['id']}.png"})
  (out / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest))
  got = shapes_judge.score(prompts, str(out))
  n_objects = sum(len(truth[r["id"]]) for r in lines[:5])
  assert got == {"images": 5, "skipped": 1, "exact": 4 / 5, "shape": (n_objects - 1) / n_objects, "colour": 1.0}
