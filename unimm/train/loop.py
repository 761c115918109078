"""The training loop: sharded state, one jitted step, checkpoints, metrics, samples, preemption.

    train(config, workdir)

Re-running on the same workdir resumes from the newest checkpoint that restores
(damaged ones are set aside: `checkpoint`) with the data iterator where it was
and the per-step RNG folded from the step, so the continued loss curve equals an
uninterrupted run's — after checking that the config changes nothing a resume
cannot take (`config_record`). SIGTERM saves a checkpoint at the current step and
returns, doing nothing else. A divergence names the last-known-good checkpoint
(`health`), which `train.rewind_to_last_good` resumes from.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from absl import logging
import flax.linen as nn
import jax
import numpy as np
import tqdm

from unimm import families, imaging
from unimm.data import documents, pipeline
from unimm.inference import placement, prompts as prompts_lib
from unimm.models import backbone
from unimm.parallel import distributed, sharding
from unimm.train import checkpoint, config_record, health as health_lib, metrics as metrics_lib, step as step_lib
from unimm.train.setup import Setup, build, flops_per_token


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
  """A fresh run's params: the pretrained parts its family names (`Family.pretrained_parts`), then a
  previous stage's params (train.init_from) over them. A Mixture-of-Transformers backbone
  (`model.backbone.mot`) started from a checkpoint without image-slot copies (a text LM: LMFusion) gets
  each copy from the checkpoint's text weights."""
  total = len(jax.tree.leaves(params))
  for prefix, directory, extract in families.of(config).pretrained_parts(config):
    part = extract(checkpoint.Checkpointer(directory, async_save=False).restore_params())
    params, done = graft(params, part, prefix)
    logging.info("%s: %d params from %s.", prefix, len(done), directory)
  if config.train.init_from:
    previous = checkpoint.Checkpointer(config.train.init_from, async_save=False).restore_params()
    mot = tuple(config.model.backbone.get("mot", ()))
    if mot and "decoder" in previous:
      previous = {**previous, "decoder": backbone.with_image_copies(previous["decoder"], mot)}
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
  prompts = sample_prompts(config, tokenizer, setup.train.sample_prompts)
  family = families.of(config)
  if not prompts or not family.writes_images:
    return None
  slots = setup.task.model.slots
  encoded = [prompts_lib.encode([documents.Text(p)], tokenizer, slots) for p in prompts]
  params = step_lib.with_ema(state.params, state.ema)  # the EMA weights, when the run keeps them
  generator = family.image_generator(setup.task, params, tokenizer.specials,
                                     placement.Placement(setup.mesh, setup.rules))
  images = generator.generate(encoded, jax.random.key(int(config.seed) + 1), num_steps=setup.train.sample_steps,
                              guidance=setup.train.sample_guidance)
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
  t = setup.train
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
    results = evaluate_lib.evaluate(config, setup.task, step_lib.with_ema(state.params, state.ema), tokenizer,
                                    num_examples=t.eval_examples,
                                    diffusion_steps=t.eval_diffusion_steps, seed=int(config.seed), max_batches=4)
  flat = {f"eval/{k}": v for k, v in evaluate_lib.flatten(results).items()}
  writer.scalars(step, flat)
  return flat


def host_params(params):
  """Sharded params as whole NumPy arrays on every process (a collective when there are several)."""
  if jax.process_count() == 1:
    return jax.device_get(params)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(params, tiled=True)


def restore_or_start(config, workdir: str, setup: Setup, ckpt: checkpoint.Checkpointer, data, reset_data: bool):
  """(state, step): the newest checkpoint that restores (damaged ones set aside), after a rewind to the last
  known good one if asked and the run diverged; else a fresh start (also when asked to start over)."""
  t = setup.train
  diverged = health_lib.read_divergence(workdir)
  if t.rewind_to_last_good and diverged:
    good = ckpt.last_good()
    if good is None:
      raise FileNotFoundError(f"--config.train.rewind_to_last_good: {ckpt.directory} holds no last-known-good "
                              "checkpoint (none had run train.good_after_steps healthy steps before the divergence)")
    moved = ckpt.move_newer_aside(good, "rewound")
    if jax.process_index() == 0:
      health_lib.archive_divergence(workdir)
    logging.warning("Rewound to the last known good checkpoint, step %d (diverged at step %s); steps %s moved to "
                    "%s/rewound/.", good, diverged.get("step"), moved, ckpt.directory)
  try:
    state, start = ckpt.restore_newest(setup.abstract_state, None if reset_data else data)
  except checkpoint.NoUsableCheckpointError:
    if not t.restart_from_scratch:
      raise
    logging.warning("train.restart_from_scratch: no checkpoint restores; starting over from step 0.")
    state, start = None, None
  if state is not None:
    logging.info("Resumed from step %d%s.", start, " (the data iterator starts afresh)" if reset_data else "")
    if setup.abstract_state.ema is not None and state.ema is None:
      logging.info("train.ema_decay=%s: step %d has no EMA; it starts from that step's weights.",
                   setup.train.ema_decay, start)
      state = state.replace(ema=fresh_ema(setup, state.params))
    return state, start
  state = setup.init(jax.random.key(int(config.seed)))
  state = state.replace(params=start_params(config, state.params))
  return state.replace(ema=fresh_ema(setup, state.params) if state.ema is not None else None), 0


def fresh_ema(setup: Setup, params):
  """An EMA starting at `params`' trainable part, placed as the state's EMA is."""
  trainable = step_lib.Partition(setup.train.trainable).split(params)[0]
  return jax.device_put(step_lib.ema_of(trainable), setup.state_sharding.ema)


def diverged(workdir: str, ckpt: checkpoint.Checkpointer, step: int, m: dict, health: health_lib.Health, lead: bool):
  """Records the divergence and raises the error that says how to resume from the last good checkpoint."""
  good = ckpt.last_good()
  detail = (f"non-finite loss or gradient at step {step} (loss={m['loss']}, grad_norm={m['grad_norm']}"
            + (f"; {health.consecutive_skips} consecutive updates skipped" if health.consecutive_skips > 1 else "")
            + ")")
  if lead:
    health_lib.record_divergence(workdir, step, good, detail)
  where = (f"The last known good checkpoint is step {good}: resume from it with "
           "--config.train.rewind_to_last_good=True (newer checkpoints move to checkpoints/rewound/), e.g. with a "
           "lower --config.train.learning_rate" if good is not None else
           "No checkpoint is known good yet (train.good_after_steps healthy steps after one); the newest may "
           "already hold diverged weights")
  raise FloatingPointError(f"{detail}; no checkpoint was written for it. {where}. Or check the data, or set "
                           "--config.train.skip_nonfinite=True to skip such updates.")


SKIP_FIXES = {
    documents.BAD_IMAGE: "the images do not match data.image_size / data.image_channels (prepared at another "
                         "size?): re-run prepare with --image_size/--channels of this config, or change the config",
    documents.TOO_LONG: "documents do not fit a row: raise data.seq_len or set data.split_long_documents=True",
    documents.TOO_MANY_IMAGES: "rows hold too few images: raise data.max_images_per_row or data.seq_len",
    documents.CORRUPT: "records do not decode: re-run prepare on the source files",
    documents.BAD_TEXT: "text is not valid UTF-8: fix the source files and re-run prepare",
    documents.EMPTY: "records hold no text and no image: check the source's text_key/image_key",
}


def train(config, workdir: str) -> dict:
  """Trains until `config.train.num_steps` (or SIGTERM: then {"preempted": True, ...}); returns the last
  logged metrics."""
  lead = jax.process_index() == 0
  ckpt_dir = os.path.join(workdir, "checkpoints")
  # Before touching anything: a resume must not change what the checkpoint was trained with.
  resuming = checkpoint.has_step_dirs(ckpt_dir)
  record, accepted, reset_data = (config_record.check_resume(config, workdir) if resuming
                                  else (config_record.make_record(config), {}, False))
  os.makedirs(workdir, exist_ok=True)
  tokenizer = pipeline.load_tokenizer(config.data)
  families.text_vocabulary(config, tokenizer.vocab_size)  # a vocabulary too small for the tokenizer fails here
  mesh = sharding.make_mesh(config.mesh)
  setup = build(config, mesh, tokenizer.vocab_size, families.load_frozen_codec(config))
  t = setup.train
  logging.info("Mesh %s; %d parameters (%d in matmuls).", dict(mesh.shape), setup.total_params, setup.matmul_params)

  data = pipeline.build_pipeline(config, "train", jax.process_index(), jax.process_count())
  ckpt = checkpoint.Checkpointer(ckpt_dir, keep=t.keep_checkpoints, async_save=t.async_checkpoints,
                                 set_aside_incomplete=True)
  state, start = restore_or_start(config, workdir, setup, ckpt, data, reset_data)
  if lead:
    config_record.write_record(workdir, record)
    config_record.log_changes(workdir, start, accepted, reset_data and start > 0)
  writer = metrics_lib.MetricWriter(workdir, enabled=lead, resume_step=start)
  health = health_lib.Health(good_after=t.good_after_steps, spike_factor=t.loss_spike_factor,
                             max_consecutive_skips=t.max_consecutive_skips)
  rng = jax.random.key(int(config.seed) + 17)
  window, window_skips = None, 0
  window_tokens, window_start = 0, time.perf_counter()
  skipped = {r: 0 for r in documents.SKIP_REASONS}
  seen_documents, warned = 0, set()
  flops_token = flops_per_token(setup, config)
  last = {}
  bar = tqdm.tqdm(total=t.num_steps, initial=start, disable=not lead, dynamic_ncols=True, desc="train")
  step, preempted = start, False
  try:
    with distributed.Preemption() as preemption:
      while step < t.num_steps:
        local = next(data)
        stats = local.pop("stats")
        for r in skipped:
          skipped[r] += int(np.sum(stats[r]))
        seen_documents += int(np.sum(np.max(local["segment_ids"], axis=-1)))
        window_tokens += int(np.sum(local["segment_ids"] > 0)) * jax.process_count()
        state, m = setup.step(state, sharding.global_batch(local, mesh), rng)
        m = jax.device_get(m)  # blocks every step: keeps queued collectives bounded
        step += 1
        _, good = health.observe(step, float(m["loss"]), bool(m["finite"]))
        if good is not None:
          ckpt.mark_good(good, f"{t.good_after_steps} healthy steps followed it")
        ckpt.candidates = set(health.candidates[:1])  # the next to become good; newer ones may rotate out
        if not m["finite"]:
          window_skips += 1
          if not t.skip_nonfinite or health.too_many_skips:
            diverged(workdir, ckpt, step, m, health, lead)
        else:
          names = tuple(sorted(k for k in m if k != "finite"))
          update = metrics_lib.averages(names).single_from_model_output(**{k: m[k] for k in names})
          window = update if window is None else window.merge(update)
        bar.update(1)
        if step % t.log_every == 0 or step == t.num_steps:
          seconds = time.perf_counter() - window_start
          last = {k: float(v) for k, v in window.compute().items()} if window is not None else {}
          tokens_per_s = window_tokens / max(seconds, 1e-9)
          last.update({
              "tokens_per_s": tokens_per_s,
              "model_flops_per_s_per_device": tokens_per_s * flops_token / jax.device_count(),
              "skipped_updates": float(window_skips), "skipped_updates_total": float(health.total_skips),
              **{f"skipped_records/{r}": float(c) for r, c in skipped.items()}})
          writer.scalars(step, last)
          bar.set_postfix({k.replace("_loss", ""): f"{v:.3f}" for k, v in last.items()
                           if k == "loss" or (k.endswith("_loss") and v)})
          warn_about_skips(skipped, seen_documents, setup.data.warn_skip_rate, warned)
          window, window_skips, window_tokens, window_start = None, 0, 0, time.perf_counter()
        preempted = preemption.reached(step)  # every process agrees on the step
        if preempted:  # save and exit, nothing else (no sample, eval or final evaluation)
          ckpt.save(step, state, data)
          logging.warning("SIGTERM: saved a checkpoint at step %d; exiting.", step)
          break
        if t.sample_every and step % t.sample_every == 0:
          write_samples(setup, config, state, tokenizer, step, workdir, writer)
        if t.eval_every and step % t.eval_every == 0:
          run_eval(setup, config, state, tokenizer, step, writer)
        if step % t.checkpoint_every == 0 or step == t.num_steps:
          ckpt.save(step, state, data)
          health.saved(step)
  except BaseException:
    with contextlib.suppress(Exception):  # let an in-flight save of an earlier, healthy step finish
      ckpt.close()
    raise
  bar.close()
  ckpt.close()
  writer.close()
  if preempted:
    return {"step": step, "preempted": True, **last}
  family = families.of(config)
  if family.after_training is not None and step >= t.num_steps:
    params = host_params(state.params)  # every process takes part in gathering them
    if lead:
      family.after_training(config, params, step, ckpt.directory)  # e.g. the VAE's latent statistics
    distributed.barrier("after_training")
  if lead:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump({"step": step, **last}, f, indent=1)
  return {"step": step, **last}


def warn_about_skips(skipped: dict, documents_seen: int, threshold: float, warned: set) -> None:
  """Says so, once per reason, when a reason's share of the records read passes `threshold`."""
  total = documents_seen + sum(skipped.values())
  for reason, count in skipped.items():
    if reason not in warned and total and count / total > threshold:
      warned.add(reason)
      logging.warning("%.0f%% of the records read so far were skipped as %r (%d of %d): %s.", 100 * count / total,
                      reason, count, total, SKIP_FIXES.get(reason, "check the sources"))
