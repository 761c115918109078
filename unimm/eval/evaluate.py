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
* image tokenizers (family vq): reconstruction PSNR, codebook usage and
  perplexity over the test images' codes, and whether reconstructions keep
  the detector's (shapes) or classifier's (digits) verdicts; reconstructions
  are written as PNG.
* image encoders (family siglip): zero-shot image→text accuracy among the test
  split's distinct captions (for digits that is ten-way zero-shot
  classification) and text→image recall@1.

A dataset named by several sources (a Janus stage's understanding, text and
generation views of one dataset) is evaluated once, under its first source's name.
A test record that is not usable (it does not decode; its image is not the
model's shape) is passed over and counted: each dataset's `skipped` holds the
counts by reason, and a dataset left with no example reports only those.

Scoring functions are pure (`score_*`), so they are tested on references.
"""

from __future__ import annotations

import json
import math
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from unimm import families
from unimm.data import digits, documents, layout, shapes
from unimm.inference import placement as placement_lib, prompts as prompts_lib


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


def psnr(images: np.ndarray, references: np.ndarray) -> np.ndarray:
  """Peak signal-to-noise ratio (dB) per uint8 image; identical images score 100."""
  err = np.mean(np.square(images.astype(np.float64) - references.astype(np.float64)),
                axis=tuple(range(1, images.ndim)))
  return np.where(err > 0, 10.0 * np.log10(255.0 ** 2 / np.maximum(err, 1e-12)), 100.0)


def score_shapes_reconstructions(recon: np.ndarray, images: np.ndarray, captions: list[str]) -> dict:
  """The detector on reconstructions: agreement with its reading of the originals, and caption accuracy of both."""
  agree = np.mean([shapes.detect(r) == shapes.detect(o) for r, o in zip(recon, images)])
  return {"detector_agreement": float(agree),
          "detector_accuracy": score_shapes_images(recon, captions)["accuracy"],
          "detector_accuracy_on_originals": score_shapes_images(images, captions)["accuracy"]}


# -- running ------------------------------------------------------------------------------

def load_pairs(spec, split: str, data_dir: str, limit: int, image_shape) -> tuple[list[str], np.ndarray, dict]:
  """(captions, uint8 images [N, *image_shape], skipped): the first `limit` usable image–caption pairs of a split.

  A record that is not usable (a `Skipped` from the source; a pair whose image is not uint8 `image_shape`)
  is passed over and counted in `skipped` ({reason: count} over `documents.SKIP_REASONS`); documents that
  are not pairs (text only) are passed over uncounted. N < `limit` when the split runs out.
  """
  from unimm.data import sources  # pylint: disable=g-import-not-at-top
  ds = sources.open_source(spec, split, data_dir)
  captions, images = [], []
  skipped = dict.fromkeys(documents.SKIP_REASONS, 0)
  for i in range(len(ds)):
    if len(captions) >= limit:
      break
    doc = ds[i]
    if isinstance(doc, documents.Document):
      doc = documents.check_document(doc, tuple(image_shape))
    if isinstance(doc, documents.Skipped):
      skipped[doc.reason] = skipped.get(doc.reason, 0) + 1
    elif doc.is_pair:
      captions.append(next(p.text for p in doc.parts if isinstance(p, documents.Text)))
      images.append(next(p for p in doc.parts if isinstance(p, documents.Image)).as_read())  # as the model reads it
  if any(skipped.values()):
    logging.warning("Evaluation data %s/%s: skipped %s.", spec.get("tfds_name") or spec.get("path"), split,
                    {k: v for k, v in skipped.items() if v})
  return captions, np.stack(images) if images else np.zeros((0, *image_shape), np.uint8), skipped


def image_sources(config):
  """(name, spec) of the config's sources with images, one per distinct dataset, in name order."""
  seen, out = set(), []
  for name in sorted(config.data.sources.keys()):
    spec = config.data.sources[name]
    key = (spec.get("kind", ""), spec.get("tfds_name", ""), spec.get("builder_config", ""), spec.get("path", ""))
    if spec.get("text_only", False) or key in seen:
      continue
    seen.add(key)
    out.append((name, spec))
  return out


def zero_shot_scores(image_emb: np.ndarray, text_emb: np.ndarray, labels: np.ndarray) -> dict:
  """Image i's caption is text `labels[i]` of the candidates. image→text: is its most similar text its
  own; text→image recall@1: is a text's most similar image one of its own (over texts with images)."""
  sims = _unit(image_emb) @ _unit(text_emb).T
  i2t = np.argmax(sims, axis=1) == labels
  best_image = np.argmax(sims, axis=0)
  present = np.unique(labels)
  t2i = labels[best_image[present]] == present
  return {"image_to_text_accuracy": float(np.mean(i2t)), "text_to_image_recall_at_1": float(np.mean(t2i)),
          "candidates": int(text_emb.shape[0]), "examples": int(len(labels))}


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def evaluate_siglip(config, task, params, tokenizer, *, num_examples: int = 200) -> dict:
  """Zero-shot use of a SigLIP image–text pair of towers on each embedded dataset's test split."""
  from unimm.models import vit  # pylint: disable=g-import-not-at-top
  embed_images, embed_texts = jax.jit(task.image_embeddings), jax.jit(task.text_embeddings)
  results = {}
  image_shape = layout.image_shape_of(config.data)
  for name, spec in image_sources(config):
    captions, images, skipped = load_pairs(spec, "test", config.data.data_dir, num_examples, image_shape)
    if not captions:
      results[name] = {"examples": 0, "skipped": skipped}
      continue
    candidates = sorted(set(captions))
    labels = np.array([candidates.index(c) for c in captions])
    img = np.concatenate([np.asarray(embed_images(params, jnp.asarray(images[i:i + 64])))
                          for i in range(0, len(images), 64)])
    rows = vit.caption_rows(candidates, tokenizer, int(config.data.image_slots), int(config.data.seq_len))
    txt = np.concatenate([np.asarray(embed_texts(params, jax.tree.map(lambda v: v[i:i + 64], rows)))
                          for i in range(0, len(candidates), 64)])
    results[name] = {**zero_shot_scores(img, txt, labels), "skipped": skipped}
  return results


def perplexity(task, params, config, max_batches: int, eoi: int) -> float:
  """exp(mean next-token loss) over the text targets of the validation rows, images read clean.

  Text targets are the same for every family: not an image slot, nor the EOI that closes an image
  (code families train on both, continuous ones on neither).
  """
  from unimm.data import pipeline  # pylint: disable=g-import-not-at-top
  from unimm.models import losses  # pylint: disable=g-import-not-at-top

  @jax.jit
  def sums(params, batch):
    logits = task.logits(params, batch)
    targets = batch["tokens"][:, 1:]
    w = batch["loss_weights"][:, :-1] * (batch["image_ids"][:, 1:] == 0) * (targets != eoi)
    ce, _ = losses.cross_entropy(logits[:, :-1], targets, w)
    return ce, jnp.sum(w)

  total = count = 0.0
  it = pipeline.build_pipeline(config, "validation", num_epochs=1, shuffle=False, shards=1)
  for b, batch in enumerate(it):
    if b >= max_batches:
      break
    batch.pop("stats")
    ce, n = sums(params, {k: jnp.asarray(v) for k, v in full_batch(batch, int(config.data.batch_size)).items()})
    total, count = total + float(ce), count + float(n)
  return math.exp(total / max(count, 1.0))


def evaluate_tokenizer(config, task, params, *, num_examples: int = 200, out_dir: str | None = None) -> dict:
  """An image tokenizer (family vq) on the test split: PSNR, codebook usage, verdicts on reconstructions."""
  from unimm import imaging  # pylint: disable=g-import-not-at-top
  from unimm.models import quantizer  # pylint: disable=g-import-not-at-top
  model = task.vq

  @jax.jit
  def reconstruct(images):
    recon, aux = model.apply({"params": params["vq"]}, images)
    return jnp.clip(jnp.round((recon + 1.0) * 127.5), 0, 255).astype(jnp.uint8), aux["indices"]

  results = {}
  image_shape = layout.image_shape_of(config.data)
  for name, spec in image_sources(config):
    captions, images, skipped = load_pairs(spec, "test", config.data.data_dir, num_examples, image_shape)
    if not captions:
      results[name] = {"examples": 0, "skipped": skipped}
      continue
    recon, codes = [], []
    for start in range(0, len(images), 64):
      r, c = reconstruct(jnp.asarray(images[start:start + 64]))
      recon.append(np.asarray(r))
      codes.append(np.asarray(c))
    recon, codes = np.concatenate(recon), np.concatenate(codes)
    counts = quantizer.code_counts(jnp.asarray(codes), model.cfg.codebook_size)
    out = {"psnr": float(np.mean(psnr(recon, images))),
           **{k: float(v) for k, v in quantizer.usage_from_counts(counts).items()},
           "codes_per_image": int(np.prod(codes.shape[1:])), "examples": len(images), "skipped": skipped}
    dataset = spec.get("tfds_name", "")
    if dataset == "shapes":
      out.update(score_shapes_reconstructions(recon, images, captions))
    elif dataset == "digits":
      train_captions, train_images, _ = load_pairs(spec, "train", config.data.data_dir, 10_000, image_shape)
      clf = digit_classifier(train_images, np.array([digits.parse_caption(c) for c in train_captions]))
      labels = np.array([digits.parse_caption(c) for c in captions])
      out.update(classifier_accuracy=score_digit_images(recon, labels, clf)["accuracy"],
                 classifier_accuracy_on_originals=score_digit_images(images, labels, clf)["accuracy"],
                 classifier_agreement=float(np.mean(clf.predict(recon.reshape(len(recon), -1) / 255.0)
                                                    == clf.predict(images.reshape(len(images), -1) / 255.0))))
    if out_dir:
      os.makedirs(out_dir, exist_ok=True)
      pairs = np.stack([images[:32], recon[:32]], axis=1).reshape(-1, *images.shape[1:])  # original, recon, …
      path = os.path.join(out_dir, f"reconstructions_{name}.png")
      imaging.save_image_grid(pairs, path, columns=16)
      out["png"] = path
    results[name] = out
  return results


def full_batch(batch: dict, rows: int) -> dict:
  """A short last `batch` padded to `rows` rows with copies of its first row that weigh nothing: every batch
  has one shape, so the scoring program compiles once (and the copies are real rows: no empty-row edge case)."""
  short = rows - len(batch["tokens"])
  if short <= 0:
    return batch
  padded = {k: np.concatenate([v, np.repeat(v[:1], short, axis=0)]) for k, v in batch.items()}
  padded["loss_weights"][-short:] = 0
  return padded


def evaluate(config, task, params, tokenizer, **options) -> dict:
  """All metrics of the config's family that apply to its embedded sources (its evaluator: see
  `unimm.families.Family`); a dict ready for eval.json. `options`: those of `evaluate_unified`."""
  family = families.of(config)
  if family.evaluate is None:
    raise ValueError(f"family {family.name!r} has no evaluator: set config.train.final_eval_examples=0 and "
                     "eval_every=0, or give its record one (families.Family.evaluate)")
  return family.evaluate(config, task, params, tokenizer, **options)


def evaluate_unified(config, task, params, tokenizer, *, num_examples: int = 200, diffusion_steps: int = 50,
                     guidance: float = 3.0, seed: int = 0, max_batches: int = 20, out_dir: str | None = None,
                     sampler: str | None = None) -> dict:
  """A unified model (reads and writes text and images): perplexity on the text, and on each embedded
  image source text→image and image→text scored by the dataset's verdicts. `sampler`: a diffusion family's
  sampler (None: its objective's default); code families ignore it."""
  del out_dir  # no files
  family = families.of(config)
  d = config.data
  image_shape = layout.image_shape_of(d)
  where = placement_lib.Placement.from_config(config)
  results: dict = {"text": {"perplexity": perplexity(task, params, config, max_batches, tokenizer.specials.eoi)}}
  rng = jax.random.key(seed)
  slots = task.model.slots
  for name, spec in image_sources(config):
    dataset = spec.get("tfds_name", "")
    if dataset not in ("shapes", "digits"):
      continue
    captions, images, skipped = load_pairs(spec, "test", d.data_dir, num_examples, image_shape)
    if not captions:
      results[name] = {"examples": 0, "skipped": skipped}
      continue
    t2i_prompts = [prompts_lib.encode([documents.Text(c)], tokenizer, slots) for c in captions]
    i2t_prompts = [prompts_lib.encode([documents.Image(im)], tokenizer, slots) for im in images]
    image_gen = family.image_generator(task, params, tokenizer.specials, where)
    text_gen = family.text_generator(task, params, tokenizer.specials, where)
    generated, texts = [], []
    for start in range(0, len(captions), 32):
      rng, sub = jax.random.split(rng)
      generated.append(image_gen.generate(t2i_prompts[start:start + 32], sub, num_steps=diffusion_steps,
                                          guidance=guidance, sampler=sampler))
      outs = text_gen.generate(i2t_prompts[start:start + 32], max_new_tokens=32)
      texts += [tokenizer.decode([t for t in o if t != tokenizer.specials.eos]) for o in outs]
    generated = np.concatenate(generated)
    if dataset == "shapes":
      results[name] = {"text_to_image": score_shapes_images(generated, captions),
                       "image_to_text": score_shapes_captions(texts, captions)}
    else:
      train_captions, train_images, _ = load_pairs(spec, "train", d.data_dir, 10_000, image_shape)
      clf = digit_classifier(train_images, np.array([digits.parse_caption(c) for c in train_captions]))
      labels = np.array([digits.parse_caption(c) for c in captions])
      results[name] = {"text_to_image": score_digit_images(generated, labels, clf),
                       "image_to_text": score_digit_captions(texts, labels),
                       "classifier_accuracy_on_real_test": score_digit_images(images, labels, clf)["accuracy"]}
    results[name]["examples"] = len(captions)
    results[name]["skipped"] = skipped
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
