"""Evaluation on the embedded data: what a checkpoint can do, measured honestly.

    python -m unimm.main --mode=eval --config=... --workdir=...   → WORKDIR/eval.json (+ TensorBoard)

* shapes, text→image: images generated for test captions, read by the
  dataset's detector. `accuracy`: every named object has the right colour and
  shape in its quadrant and the other quadrants are empty; per attribute:
  colour, shape and position (over named objects) and count (per image).
* shapes, image→text: captions generated for test images. `exact_match` of the
  text; per attribute from the parsed caption (unparsable captions score 0).
* digits: a logistic-regression classifier trained on the real training split
  scores generated digits against the prompted class; captioning accuracy of
  the parsed digit word.
* text: perplexity of the validation rows' text targets (images read clean).

Scoring functions are pure (`score_*`), so they are tested on references.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from unimm.data import digits, documents, shapes


# -- scoring ------------------------------------------------------------------------------

def _attribute_hits(want: dict, got: dict) -> np.ndarray:
  """[named, position, colour, shape] counts over the objects `want` names (both: quadrant → Obj)."""
  hits = np.zeros(4, np.int64)
  for q, o in want.items():
    found = got.get(q)
    hits += (1, found is not None, found is not None and found.color == o.color,
             found is not None and found.shape == o.shape)
  return hits


def _attribute_rates(hits: np.ndarray) -> dict:
  named = max(int(hits[0]), 1)
  return {"position_accuracy": float(hits[1] / named), "colour_accuracy": float(hits[2] / named),
          "shape_accuracy": float(hits[3] / named)}


def score_shapes_images(images: np.ndarray, captions: list[str]) -> dict:
  """Text→image accuracies of generated 32×32 RGB images against their captions."""
  full = count = 0
  hits = np.zeros(4, np.int64)
  for image, text in zip(images, captions):
    want = {o.quadrant: o for o in shapes.parse_caption(text)}
    got = {o.quadrant: o for o in shapes.detect(image)}
    full += got == want
    count += len(got) == len(want)
    hits += _attribute_hits(want, got)
  n = max(len(captions), 1)
  return {"accuracy": full / n, "count_accuracy": count / n, **_attribute_rates(hits)}


def score_shapes_captions(texts: list[str], truths: list[str]) -> dict:
  """Image→text accuracies of generated captions against the true ones."""
  exact = count = parsed_ok = 0
  hits = np.zeros(4, np.int64)
  for text, truth in zip(texts, truths):
    exact += text.strip() == truth
    want = {o.quadrant: o for o in shapes.parse_caption(truth)}
    parsed = shapes.parse_caption(text)
    got = {o.quadrant: o for o in parsed} if parsed else {}
    parsed_ok += parsed is not None
    count += parsed is not None and len(got) == len(want)
    hits += _attribute_hits(want, got)
  n = max(len(truths), 1)
  return {"exact_match": exact / n, "parsable": parsed_ok / n, "count_accuracy": count / n, **_attribute_rates(hits)}


def digit_classifier(train_images: np.ndarray, train_labels: np.ndarray):
  """A classifier of 8×8 uint8 digits (logistic regression on pixels) trained on real data."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  clf = LogisticRegression(max_iter=2000)
  clf.fit(train_images.reshape(len(train_images), -1) / 255.0, train_labels)
  return clf


def score_digit_images(images: np.ndarray, labels: np.ndarray, classifier) -> dict:
  pred = classifier.predict(images.reshape(len(images), -1) / 255.0)
  return {"accuracy": float(np.mean(pred == labels))}


def score_digit_captions(texts: list[str], labels: np.ndarray) -> dict:
  parsed = [digits.parse_caption(t) for t in texts]
  return {"accuracy": float(np.mean([p == l for p, l in zip(parsed, labels)])),
          "parsable": float(np.mean([p is not None for p in parsed]))}


# -- running ------------------------------------------------------------------------------

def _pairs(spec, split: str, data_dir: str, limit: int) -> tuple[list[str], np.ndarray]:
  from unimm.data import sources  # pylint: disable=g-import-not-at-top
  ds = sources.open_source(spec, split, data_dir)
  captions, images = [], []
  for i in range(min(limit, len(ds))):
    doc = ds[i]
    if isinstance(doc, documents.Document) and doc.is_pair:
      captions.append(next(p.text for p in doc.parts if isinstance(p, documents.Text)))
      images.append(doc.images[0])
  return captions, np.stack(images)


def perplexity(task, params, config, max_batches: int) -> float:
  """exp(mean next-token loss) over the text targets of the validation rows, images read clean."""
  from unimm.data import pipeline  # pylint: disable=g-import-not-at-top
  from unimm.models import transfusion  # pylint: disable=g-import-not-at-top

  @jax.jit
  def sums(params, batch):
    latents = task.encode_images(batch["images"])
    t = jnp.zeros(batch["image_valid"].shape, jnp.int32)
    logits, _ = task.model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"],
                                 batch["image_ids"], latents, t)
    w = batch["loss_weights"][:, :-1]
    ce, _ = transfusion.cross_entropy(logits[:, :-1], batch["tokens"][:, 1:], w)
    return ce, jnp.sum(w)

  total = count = 0.0
  it = pipeline.build_pipeline(config, "validation", num_epochs=1, shuffle=False)
  for b, batch in enumerate(it):
    if b >= max_batches:
      break
    batch.pop("stats")
    ce, n = sums(params, {k: jnp.asarray(v) for k, v in batch.items()})
    total, count = total + float(ce), count + float(n)
  return math.exp(total / max(count, 1.0))


def evaluate(config, task, params, tokenizer, *, num_examples: int = 200, diffusion_steps: int = 50,
             guidance: float = 3.0, seed: int = 0, max_batches: int = 20) -> dict:
  """All metrics that apply to the config's embedded sources; a dict ready for eval.json."""
  # pylint: disable=g-import-not-at-top
  from unimm.inference import images as images_lib, placement as placement_lib
  from unimm.inference import prompts as prompts_lib, text as text_lib
  # pylint: enable=g-import-not-at-top
  d = config.data
  where = placement_lib.Placement.from_config(config)
  results: dict = {"text": {"perplexity": perplexity(task, params, config, max_batches)}}
  rng = jax.random.key(seed)
  slots = task.model.slots
  for name in sorted(d.sources.keys()):
    spec = d.sources[name]
    dataset = spec.get("tfds_name", "")
    if dataset not in ("shapes", "digits"):
      continue
    captions, images = _pairs(spec, "test", d.data_dir, num_examples)
    t2i_prompts = [prompts_lib.encode([documents.Text(c)], tokenizer, slots) for c in captions]
    i2t_prompts = [prompts_lib.encode([documents.Image(im)], tokenizer, slots) for im in images]
    image_gen = images_lib.ImageGenerator(task, params, tokenizer.specials, where)
    text_gen = text_lib.TextGenerator(task, params, tokenizer.specials, where)
    generated, texts = [], []
    for start in range(0, len(captions), 32):
      rng, sub = jax.random.split(rng)
      generated.append(image_gen.generate(t2i_prompts[start:start + 32], sub, num_steps=diffusion_steps,
                                          guidance=guidance))
      outs = text_gen.generate(i2t_prompts[start:start + 32], max_new_tokens=32)
      texts += [tokenizer.decode([t for t in o if t != tokenizer.specials.eos]) for o in outs]
    generated = np.concatenate(generated)
    if dataset == "shapes":
      results[name] = {"text_to_image": score_shapes_images(generated, captions),
                       "image_to_text": score_shapes_captions(texts, captions)}
    else:
      train_captions, train_images = _pairs(spec, "train", d.data_dir, 10_000)
      clf = digit_classifier(train_images, np.array([digits.parse_caption(c) for c in train_captions]))
      labels = np.array([digits.parse_caption(c) for c in captions])
      results[name] = {"text_to_image": score_digit_images(generated, labels, clf),
                       "image_to_text": score_digit_captions(texts, labels),
                       "classifier_accuracy_on_real_test": score_digit_images(images, labels, clf)["accuracy"]}
    results[name]["examples"] = len(captions)
    results[name]["samples"] = [{"caption": c, "generated_caption": t} for c, t in zip(captions[:5], texts[:5])]
  return results


def flatten(results: dict, prefix: str = "") -> dict:
  """{'shapes/text_to_image/accuracy': 0.8, …} for TensorBoard."""
  out = {}
  for k, v in results.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + "/"))
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      out[key] = float(v)
  return out


def write(results: dict, workdir: str, step: int) -> str:
  path = os.path.join(workdir, "eval.json")
  with open(path, "w") as f:
    json.dump({"step": step, **results}, f, indent=1)
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  with SummaryWriter(os.path.join(workdir, "tensorboard", "eval")) as tb:
    for k, v in flatten(results).items():
      tb.add_scalar(k, v, step)
  return path
