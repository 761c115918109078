"""Run as a script (8 fake CPU devices): generation on a data×fsdp×tensor mesh vs one device.

    python tests/sharded_generation_check.py  → prints RESULT {json}
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # unimm, if not installed
import test_chameleon  # pylint: disable=wrong-import-position
from test_generation import SPECIALS, prompt, tiny_task  # pylint: disable=wrong-import-position
from unimm.inference import codes, images, placement, text  # pylint: disable=wrong-import-position
from unimm.parallel import sharding  # pylint: disable=wrong-import-position


def generate(where):
  task, params = tiny_task(perturb=True)
  image = np.random.default_rng(0).integers(0, 256, (4, 4, 1), dtype=np.uint8)
  prompts = [prompt("11 13 12"), prompt("2 5 18"), prompt("24 12 5", image)]  # 3 rows: padded to the mesh
  gen = text.TextGenerator(text.DiffusionStepper(task, params, SPECIALS, where))
  plain = gen.generate(prompts, max_new_tokens=8)
  mixed = gen.generate_mixed(prompts, max_new_tokens=10, rng=jax.random.key(1),
                             diffusion=images.DiffusionOptions(num_steps=4))
  pictures = images.ImageGenerator(task, params, SPECIALS, where).generate(prompts, jax.random.key(2), num_steps=4)
  leaves = jax.tree_util.tree_leaves_with_path(gen.stepper.params)
  specs = {jax.tree_util.keystr(p): str(x.sharding.spec) for p, x in leaves}
  return {"plain": plain, "mixed_tokens": [g.tokens for g in mixed],
          "mixed_images": [np.stack(g.images).astype(int).tolist() if g.images else [] for g in mixed],
          "images": pictures.astype(int).tolist(), "specs": specs}


def generate_codes(where):
  """Chameleon: greedy guided codes and constrained text (a BOI draws an image) on `where`."""
  task, params = test_chameleon.tiny_task()
  image = test_chameleon.random_images(1, 4)[0]
  prompts = [test_chameleon.prompt("1 2 3"), test_chameleon.prompt("4", image), test_chameleon.prompt("2 2")]
  greedy = codes.CodeSampling(temperature=0.0)
  pictures = codes.CodeImageGenerator(task, params, test_chameleon.SPECIALS, where, greedy).generate(
      prompts, jax.random.key(2), guidance=3.0)
  outs = text.TextGenerator(codes.CodeStepper(task, params, test_chameleon.SPECIALS, where, greedy)).generate_mixed(
      prompts, max_new_tokens=8, rng=jax.random.key(1))
  return {"images": pictures.astype(int).tolist(), "tokens": [g.tokens for g in outs]}


def main():
  one = generate(placement.Placement.single_device())
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1})
  eight = generate(placement.Placement(mesh, sharding.RULES["default"]))
  one["codes"] = generate_codes(placement.Placement.single_device())
  eight["codes"] = generate_codes(placement.Placement(mesh, sharding.RULES["default"]))
  print("RESULT " + json.dumps({"devices": jax.device_count(), "one": one, "eight": eight}))


if __name__ == "__main__":
  main()
