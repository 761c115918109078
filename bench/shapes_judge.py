"""A second opinion on text→image for `shapes`: prompts and a judge that share nothing with the dataset code.

    python bench/shapes_judge.py prompts --out=/tmp/judge/prompts.jsonl --n=100 [--order=raster|reversed]
    python -m unimm.main --mode=sample --config=configs/transfusion/tiny.py --workdir=/tmp/unimm_demo \\
        --prompts=/tmp/judge/prompts.jsonl --out=/tmp/judge/out --diffusion_steps=50
    python bench/shapes_judge.py score --prompts=/tmp/judge/prompts.jsonl --out=/tmp/judge/out

`prompts` writes sample-mode requests from its own random scenes (1–2 objects, its own seed) with the
objects named in raster order as the dataset's captions are, or `reversed` (the order a caption never
has), and next to them the truth (`PROMPTS.truth.json`). `score` reads each generated PNG with a judge
unlike `unimm.data.shapes.detect` (which thresholds a channel at 127 and tests a blob's bounding-box fill):
each pixel takes the nearest of black and the six colours, and a quadrant's lit pixels are matched
against every circle, square and triangle of side 8–14 at every offset; the best intersection-over-union
names the shape. Prints one JSON line: the fraction of images whose quadrants hold exactly the prompted
objects, and per-object shape and colour accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import random

import numpy as np
from PIL import Image

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "magenta": (255, 0, 255), "cyan": (0, 255, 255)}
SHAPES = ("circle", "square", "triangle")
PLACES = ("top left", "top right", "bottom left", "bottom right")  # quadrants in raster order
QUADRANT = 16
MIN_LIT = 12  # fewer lit pixels: an empty quadrant
_PALETTE = np.array([(0, 0, 0), *COLOURS.values()], np.float64)


def write_prompts(path: str, n: int, order: str, seed: int) -> None:
  rng = random.Random(seed)
  truth = {}
  with open(path, "w") as f:
    for i in range(n):
      quadrants = sorted(rng.sample(range(4), rng.choice((1, 2))))
      objects = [(rng.choice(list(COLOURS)), rng.choice(SHAPES), q) for q in quadrants]
      named = objects[::-1] if order == "reversed" else objects
      text = " and ".join(f"a {colour} {shape} at the {PLACES[q]}" for colour, shape, q in named)
      f.write(json.dumps({"id": f"p{i}", "parts": [{"text": text}], "generate": "image"}) + "\n")
      truth[f"p{i}"] = objects
  with open(path + ".truth.json", "w") as f:
    json.dump(truth, f)


def _templates() -> tuple[list[str], np.ndarray]:
  """Every shape of side 8–14 at every offset in a quadrant: names, masks [K, 16·16]."""
  names, masks = [], []
  for side in range(8, 15):
    yy, xx = np.mgrid[0:side, 0:side] + 0.5
    half = side / 2
    for name, mask in (("circle", (yy - half) ** 2 + (xx - half) ** 2 <= half ** 2),
                       ("square", np.ones((side, side), bool)), ("triangle", np.abs(xx - half) <= yy / 2)):
      for y in range(QUADRANT - side + 1):
        for x in range(QUADRANT - side + 1):
          canvas = np.zeros((QUADRANT, QUADRANT), bool)
          canvas[y:y + side, x:x + side] = mask
          names.append(name)
          masks.append(canvas.reshape(-1))
  return names, np.stack(masks).astype(np.float64)


_NAMES, _MASKS = _templates()


def judge(image: np.ndarray) -> dict[int, tuple[str, str]]:
  """{quadrant: (colour, shape)} for a [32, 32, 3] uint8 image."""
  labels = np.argmin(((image[..., None, :].astype(np.float64) - _PALETTE) ** 2).sum(-1), axis=-1)
  found = {}
  for q in range(4):
    qy, qx = divmod(q, 2)
    quadrant = labels[qy * QUADRANT:(qy + 1) * QUADRANT, qx * QUADRANT:(qx + 1) * QUADRANT].reshape(-1)
    lit = quadrant > 0
    if lit.sum() < MIN_LIT:
      continue
    colour = list(COLOURS)[int(np.bincount(quadrant[lit], minlength=len(_PALETTE))[1:].argmax())]
    overlap = _MASKS @ lit
    iou = overlap / (_MASKS.sum(1) + lit.sum() - overlap)
    found[q] = (colour, _NAMES[int(np.argmax(iou))])
  return found


def score(prompts: str, out: str) -> dict:
  with open(prompts + ".truth.json") as f:
    truth = json.load(f)
  exact = shapes_right = colours_right = objects = images = 0
  skipped = []
  with open(os.path.join(out, "manifest.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if "image" not in record:  # a request that failed: counted, not scored
        skipped.append(record.get("id"))
        continue
      image = np.asarray(Image.open(os.path.join(out, record["image"])).convert("RGB"))
      want = {q: (colour, shape) for colour, shape, q in truth[record["id"]]}
      got = judge(image)
      images += 1
      exact += got == want
      for q, (colour, shape) in want.items():
        objects += 1
        shapes_right += q in got and got[q][1] == shape
        colours_right += q in got and got[q][0] == colour
  return {"images": images, "skipped": len(skipped), "exact": exact / max(images, 1),
          "shape": shapes_right / max(objects, 1), "colour": colours_right / max(objects, 1)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("prompts")
  p.add_argument("--out", required=True)
  p.add_argument("--n", type=int, default=100)
  p.add_argument("--order", choices=("raster", "reversed"), default="raster")
  p.add_argument("--seed", type=int, default=1234)
  s = sub.add_parser("score")
  s.add_argument("--prompts", required=True)
  s.add_argument("--out", required=True)
  args = parser.parse_args()
  if args.command == "prompts":
    write_prompts(args.out, args.n, args.order, args.seed)
  else:
    print(json.dumps(score(args.prompts, args.out)))


if __name__ == "__main__":
  main()
