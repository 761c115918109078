"""Sampling speed for a config (randomly initialised: speed does not depend on the weights); prints JSON.

    python bench/sample.py [--config=configs/transfusion/tiny.py] [--batch=8] [--set key=value ...]

Reported, each the median of --repeats timed calls after a compiling one:
* `seconds_per_image`: text→image at 50 and 250 denoising steps, with classifier-free guidance
  (conditional and unconditional rows in one batch) and without, for --batch prompts of 16 tokens;
* `text_tokens_per_s`: KV-cached greedy decoding of 64 tokens for --batch prompts;
* `denoising_step_s`: seconds per denoising step (CFG) as the text prefix grows from 16 to 512
  tokens: the cached generator runs only the image slots against the prefix, so this stays
  flat, while the uncached reference (`TransfusionTask.sample_images`, the whole row every
  step) grows with the prefix. Per-step times are differences of 60- and 10-step runs, so the
  prefill is not in them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from train_step import apply_override, load_config  # pylint: disable=wrong-import-position
from unimm import families  # pylint: disable=wrong-import-position
from unimm.data import layout  # pylint: disable=wrong-import-position
from unimm.data.tokenizer import SpecialIds  # pylint: disable=wrong-import-position
from unimm.inference import images, prompts as prompts_lib, text  # pylint: disable=wrong-import-position
from unimm.train import setup as setup_lib  # pylint: disable=wrong-import-position

SPECIALS = SpecialIds(pad=0, bos=1, eos=2, boi=3, eoi=4, img=5, reserved=())


def timed(fn, repeats: int) -> float:
  fn()  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[prompts_lib.Prompt]:
  rng = np.random.default_rng(seed)
  return [prompts_lib.Prompt([SPECIALS.bos, *rng.integers(8, vocab, length - 1).tolist()], [0] * length, [])
          for _ in range(n)]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/transfusion/tiny.py")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--prefixes", default="16,64,128,256,512")
  parser.add_argument("--set", action="append", default=[], help="config override key=value")
  args = parser.parse_args()
  config = load_config(args.config)
  for assignment in args.set:
    apply_override(config, assignment)
  vocab = int(config.data.tokenizer.vocab_size)
  task = families.build_task(config, vocab)
  params = nn.meta.unbox(jax.jit(task.init)(jax.random.key(0), task.dummy_batch(
      1, int(config.data.seq_len), layout.image_shape_of(config.data))))
  image_gen = images.ImageGenerator(task, params, SPECIALS)
  text_gen = text.TextGenerator(text.DiffusionStepper(task, params, SPECIALS))
  b, key = args.batch, jax.random.key(1)
  prompts = random_prompts(b, 16, vocab, 0)
  result = {"config": args.config, "overrides": args.set, "device": jax.devices()[0].device_kind,
            "batch": b, "image_slots": task.model.slots, "seconds_per_image": {}, "denoising_step_s": {}}

  for steps in (50, 250):
    for name, guidance in (("cfg", 3.0), ("no_cfg", None)):
      seconds = timed(lambda: image_gen.generate(prompts, key, num_steps=steps, guidance=guidance), args.repeats)
      result["seconds_per_image"][f"{steps}_steps_{name}"] = round(seconds / b, 5)

  new_tokens = 64
  counted = []

  def decode():
    outs = text_gen.generate(prompts, max_new_tokens=new_tokens)
    counted.append(sum(len(o) for o in outs))
  seconds = timed(decode, args.repeats)
  result["text_tokens_per_s"] = round(counted[-1] / seconds, 1)

  for length in (int(x) for x in args.prefixes.split(",")):
    long_prompts = random_prompts(b, length, vocab, length)
    per_step = {}
    for name, run in (
        ("cached", lambda n, p=long_prompts: image_gen.generate(p, key, num_steps=n, guidance=3.0)),
        ("uncached", lambda n, p=long_prompts: uncached(task, params, p, key, n))):
      few, many = timed(lambda r=run: r(10), args.repeats), timed(lambda r=run: r(60), args.repeats)
      per_step[name] = round((many - few) / 50, 6)
    result["denoising_step_s"][str(length)] = per_step
  cached = [v["cached"] for v in result["denoising_step_s"].values()]
  result["cached_step_longest_over_shortest"] = round(cached[-1] / cached[0], 3)
  print(json.dumps(result, indent=1))


def uncached(task, params, prompts, key, num_steps):
  """The reference sampler: the whole row (prompt, image slots) at every step, CFG twins in the batch."""
  longest = max(len(p) for p in prompts)
  captions = np.zeros((len(prompts), longest - 1), np.int32)
  for i, p in enumerate(prompts):
    captions[i, :len(p) - 1] = p.tokens[1:]
  return task.sample_images(params, captions, np.array([len(p) - 1 for p in prompts]), key, specials=SPECIALS,
                            num_steps=num_steps, guidance=3.0, image_channels=task.image_shape[-1])


if __name__ == "__main__":
  main()
