"""The training loop: sharded state, one jitted step, checkpoints, metrics, samples, preemption.

    train(config, workdir)

Re-running on the same workdir resumes from the latest complete checkpoint
with the data iterator where it was and the per-step RNG folded from the step,
so the continued loss curve equals an uninterrupted run's. SIGTERM saves a
checkpoint at the current step and returns.
"""

from __future__ import annotations

import json
import os
import time

from absl import logging
import flax.linen as nn
import jax
import numpy as np
import tqdm

from unimm import imaging
from unimm.data import documents, pipeline
from unimm.inference import generators, placement, prompts as prompts_lib
from unimm.models import autoencoders, chameleon, families
from unimm.parallel import distributed, sharding
from unimm.train import checkpoint, latent_stats, metrics as metrics_lib
from unimm.train.setup import Setup, build, flops_per_token


def load_frozen_codec(config):
  """The frozen image codec's params a family encodes images with, if the config names one:
  Transfusion's KL-VAE (model.autoencoder.checkpoint) as a `FrozenVAE` with the latent shift/scale the
  diffusion uses (resolved here, once, for training, eval and sampling alike: `latent_stats.resolve`),
  or a code family's VQ tokenizer (model.vq.checkpoint)."""
  if config.model.family in families.CODE_FAMILIES:
    if not config.model.vq.checkpoint:
      return None  # the family says what it needs
    return chameleon.frozen_tokenizer_params(
        checkpoint.Checkpointer(config.model.vq.checkpoint, async_save=False).restore_params())
  ae = config.model.autoencoder
  if config.model.family != "transfusion" or ae.kind == "identity" or not ae.checkpoint:
    return None  # families that need one say so (transfusion_task), the codec families train it
  ckpt = checkpoint.Checkpointer(ae.checkpoint, async_save=False)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint in config.model.autoencoder.checkpoint={ae.checkpoint!r}: "
                            "train the VAE first (configs/vae/...) or point it at the VAE run's checkpoints dir")
  params = ckpt.restore_params(step)
  shift, scale = latent_stats.resolve(config, params, step)
  return autoencoders.FrozenVAE(params, shift=shift, scale=scale)


def graft(params, source, prefix: str = ""):
  """`params` (placed arrays) with each leaf of `source` put at its path under `prefix`, placed like the
  leaf it replaces. Every source leaf must exist with the same shape. Returns (params, grafted paths)."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  flat = traverse_util.flatten_dict(params, sep="/")
  done = []
  for path, value in traverse_util.flatten_dict(source, sep="/").items():
    target = f"{prefix}/{path}" if prefix else path
    if target not in flat:
      raise ValueError(f"checkpoint param {target!r} is not in this model (its params start with "
                       f"{sorted({k.split('/')[0] for k in flat})})")
    if tuple(flat[target].shape) != tuple(np.shape(value)):
      raise ValueError(f"checkpoint param {target!r} has shape {np.shape(value)}, the model's {flat[target].shape}")
    flat[target] = jax.device_put(np.asarray(value, flat[target].dtype), flat[target].sharding)
    done.append(target)
  return traverse_util.unflatten_dict(flat, sep="/"), done


def start_params(config, params):
  """A fresh run's params: the pretrained parts its family names (`families.pretrained_parts`), then a
  previous stage's params (train.init_from) over them."""
  total = len(jax.tree.leaves(params))
  for prefix, directory, extract in families.pretrained_parts(config):
    part = extract(checkpoint.Checkpointer(directory, async_save=False).restore_params())
    params, done = graft(params, part, prefix)
    logging.info("%s: %d params from %s.", prefix, len(done), directory)
  if config.train.init_from:
    previous = checkpoint.Checkpointer(config.train.init_from, async_save=False).restore_params()
    params, done = graft(params, previous)
    logging.info("Started from %s: %d of %d params (the rest initialised fresh).", config.train.init_from,
                 len(done), total)
  return params


def sample_prompts(config, tokenizer, count: int) -> list[str]:
  """Captions of the first `count` image–caption pairs of the validation split (deterministic)."""
  from unimm.data import sources  # pylint: disable=g-import-not-at-top
  out = []
  for name in sorted(config.data.sources.keys()):
    spec = config.data.sources[name]
    try:
      ds = sources.open_source(spec, "validation", config.data.data_dir)
    except FileNotFoundError:
      continue
    for i in range(len(ds)):
      doc = ds[i]
      if isinstance(doc, documents.Document) and doc.is_pair:
        out.append(next(p.text for p in doc.parts if isinstance(p, documents.Text)))
      if len(out) >= count:
        return out
  return out


def write_samples(setup: Setup, config, state, tokenizer, step: int, workdir: str, writer) -> str | None:
  """Samples images for validation captions (KV-cached, on the training mesh); writes a PNG grid and to TB."""
  prompts = sample_prompts(config, tokenizer, int(config.train.sample_prompts))
  if not prompts or not generators.generates_images(setup.task):
    return None
  slots = setup.task.model.slots
  encoded = [prompts_lib.encode([documents.Text(p)], tokenizer, slots) for p in prompts]
  generator = generators.image_generator(setup.task, state.params, tokenizer.specials,
                                         placement.Placement(setup.mesh, setup.rules))
  images = generator.generate(encoded, jax.random.key(int(config.seed) + 1), num_steps=int(config.train.sample_steps),
                              guidance=float(config.train.sample_guidance))
  if jax.process_index() != 0:
    return None
  os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
  path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
  imaging.save_image_grid(images, path)
  with open(path.replace(".png", ".txt"), "w") as f:
    f.write("\n".join(prompts) + "\n")
  writer.image(step, "samples", imaging.image_grid(images))
  logging.info("Step %d: sampled %d images for validation captions → %s", step, len(images), path)
  return path


def run_eval(setup: Setup, config, state, tokenizer, step: int, writer) -> dict:
  """A small evaluation during training, logged as eval/… so TensorBoard shows quality over time."""
  from unimm.eval import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  t = config.train
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    results = evaluate_lib.evaluate(config, setup.task, state.params, tokenizer,
                                    num_examples=int(t.eval_examples),
                                    diffusion_steps=int(t.eval_diffusion_steps), seed=int(config.seed), max_batches=4)
  flat = {f"eval/{k}": v for k, v in evaluate_lib.flatten(results).items()}
  writer.scalars(step, flat)
  return flat


def host_params(params):
  """Sharded params as whole NumPy arrays on every process (a collective when there are several)."""
  if jax.process_count() == 1:
    return jax.device_get(params)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(params, tiled=True)


def train(config, workdir: str) -> dict:
  """Trains until `config.train.num_steps` (or SIGTERM); returns the last logged metrics."""
  os.makedirs(workdir, exist_ok=True)
  t = config.train
  lead = jax.process_index() == 0
  if lead:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  tokenizer = pipeline.load_tokenizer(config.data)
  families.text_vocabulary(config, tokenizer.vocab_size)  # a vocabulary too small for the tokenizer fails here
  mesh = sharding.make_mesh(config.mesh)
  setup = build(config, mesh, tokenizer.vocab_size, load_frozen_codec(config))
  logging.info("Mesh %s; %d parameters (%d in matmuls).", dict(mesh.shape), setup.total_params, setup.matmul_params)

  data = pipeline.build_pipeline(config, "train", jax.process_index(), jax.process_count())
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(t.keep_checkpoints),
                                 async_save=bool(t.async_checkpoints), set_aside_incomplete=True)
  start = ckpt.latest_step()
  if start is None:
    state = setup.init(jax.random.key(int(config.seed)))
    state = state.replace(params=start_params(config, state.params))
    start = 0
  else:
    state = ckpt.restore(start, setup.abstract_state, data)
    logging.info("Resumed from step %d.", start)
  writer = metrics_lib.MetricWriter(workdir, enabled=lead, resume_step=start)
  rng = jax.random.key(int(config.seed) + 17)
  window = None
  window_tokens, window_start = 0, time.perf_counter()
  skipped = {r: 0 for r in documents.SKIP_REASONS}
  flops_token = flops_per_token(setup, config)
  last = {}
  bar = tqdm.tqdm(total=int(t.num_steps), initial=start, disable=not lead, dynamic_ncols=True, desc="train")
  step = start
  with distributed.Preemption() as preemption:
    while step < int(t.num_steps):
      local = next(data)
      stats = local.pop("stats")
      for r in skipped:
        skipped[r] += int(np.sum(stats[r]))
      window_tokens += int(np.sum(local["segment_ids"] > 0)) * jax.process_count()
      state, m = setup.step(state, sharding.global_batch(local, mesh), rng)
      m = jax.device_get(m)  # blocks every step: keeps queued collectives bounded
      step += 1
      if not m["finite"] and not t.skip_nonfinite:
        raise FloatingPointError(
            f"non-finite loss or gradient at step {step} (loss={m['loss']}, grad_norm={m['grad_norm']}); "
            "no checkpoint was written for it. Lower the learning rate, check the data, or set "
            "--config.train.skip_nonfinite=True to skip such updates.")
      names = tuple(sorted(k for k in m if k != "finite"))
      update = metrics_lib.averages(names).single_from_model_output(**{k: m[k] for k in names})
      window = update if window is None else window.merge(update)
      bar.update(1)
      if step % int(t.log_every) == 0 or step == int(t.num_steps):
        seconds = time.perf_counter() - window_start
        last = {k: float(v) for k, v in window.compute().items()}
        tokens_per_s = window_tokens / max(seconds, 1e-9)
        last.update({
            "tokens_per_s": tokens_per_s,
            "model_flops_per_s_per_device": tokens_per_s * flops_token / jax.device_count(),
            "skipped_updates": float(not m["finite"]),
            **{f"skipped_records/{r}": float(c) for r, c in skipped.items()}})
        writer.scalars(step, last)
        bar.set_postfix({k.replace("_loss", ""): f"{v:.3f}" for k, v in last.items()
                         if k == "loss" or (k.endswith("_loss") and v)})
        window, window_tokens, window_start = None, 0, time.perf_counter()
      if int(t.sample_every) and step % int(t.sample_every) == 0:
        write_samples(setup, config, state, tokenizer, step, workdir, writer)
      if int(t.eval_every) and step % int(t.eval_every) == 0:
        run_eval(setup, config, state, tokenizer, step, writer)
      preempted = preemption.reached(step)  # every process agrees on the step
      if step % int(t.checkpoint_every) == 0 or step == int(t.num_steps) or preempted:
        ckpt.save(step, state, data)
      if preempted:
        logging.warning("SIGTERM: saved a checkpoint at step %d; exiting.", step)
        break
  bar.close()
  ckpt.close()
  writer.close()
  if config.model.family == "kl_vae" and step >= int(t.num_steps):
    # Consumers diffuse in (z − shift)·scale: measure it once, here, on the final params.
    params = host_params(state.params)
    if lead:
      latent_stats.record_after_training(config, params, step, ckpt.directory)
    distributed.barrier("latent_stats_recorded")
  if lead:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump({"step": step, **last}, f, indent=1)
  return {"step": step, **last}
