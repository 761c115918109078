"""A KL-VAE's latent statistics: the shift and scale its consumers diffuse in, stored with the VAE run.

The diffusion sees z' = (z − shift)·scale (diffusers' `shift_factor`/`scaling_factor`), z a posterior
sample mean + σ·ε as `TransfusionTask.encode_images` draws it in training. Default: shift 0 and scale
1/std of z over the first `model.autoencoder.stats_images` valid images of the train pipeline;
`stats_center` also takes shift = their mean (the scale is 1/std about the mean either way).

They live in the VAE's checkpoints directory (what consumers name in `model.autoencoder.checkpoint`)
as `latent_stats.json`, so every consumer (training, --mode=eval, --mode=sample, the in-training
sampler) reads the same values:

    {"shift": 0.0, "scale": 1.37, "mean": 0.02, "std": 0.73, "centered": false, "images": 1024,
     "step": 2000, "source": "...", "format": 1}

`step` is the VAE checkpoint they were measured on. Written (atomically) at the end of a `kl_vae`
training run from its own train split, or, when a consumer finds no file or one from an older step
than the VAE's latest checkpoint, by that consumer from its train split (with a warning), process 0
writing and the others reading it after a barrier. A consumer config with `model.autoencoder.scale`
> 0 pins shift and scale and never touches the file. Orbax's CheckpointManager ignores the file (only
step directories count), and so does `checkpoint.incomplete_step_dirs`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from absl import logging
import jax
import numpy as np

from unimm.models import autoencoders
from unimm.parallel import distributed

STATS_FILE = "latent_stats.json"
FORMAT = 1
# Images per encoder call: bounded so measuring fits beside nothing else on one device at paper scale.
ENCODE_IMAGES = 64


@dataclasses.dataclass(frozen=True)
class LatentStats:
  shift: float  # the diffusion sees (z − shift)·scale
  scale: float
  mean: float  # of the measured latents z (all elements)
  std: float  # about `mean`
  centered: bool  # shift = mean (else 0)
  images: int  # how many images were measured
  step: int  # the VAE checkpoint step they were measured on
  source: str  # who measured them, on what data
  format: int = FORMAT


def stats_path(directory: str) -> str:
  return os.path.join(directory, STATS_FILE)


def read(directory: str) -> LatentStats | None:
  """The stats stored in a VAE's checkpoints `directory` (None if there are none)."""
  path = stats_path(directory)
  try:
    with open(path) as f:
      raw = json.load(f)
  except FileNotFoundError:
    return None
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON ({e}): delete it to have it measured again") from e
  names = {f.name for f in dataclasses.fields(LatentStats)}
  if not isinstance(raw, dict) or not names - {"format"} <= raw.keys():
    raise ValueError(f"{path} lacks some of {sorted(names)}: delete it to have it measured again")
  stats = LatentStats(**{k: raw[k] for k in names if k in raw})
  if not (math.isfinite(stats.scale) and stats.scale > 0 and math.isfinite(stats.shift)):
    raise ValueError(f"{path} holds shift={stats.shift}, scale={stats.scale}: delete it to have it measured "
                     "again, or pin --config.model.autoencoder.scale")
  return stats


def write(directory: str, stats: LatentStats) -> str:
  """Writes `stats` to `directory`/latent_stats.json atomically (a reader sees the old file or the new)."""
  path = stats_path(directory)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(dataclasses.asdict(stats), f, indent=1)
    f.write("\n")
  os.replace(tmp, path)
  return path


def shift_and_scale(mean: float, std: float, center: bool) -> tuple[float, float]:
  """(shift, scale) that give latents of mean 0 (centered) or mean/std, and std 1."""
  if not (math.isfinite(std) and std > 0):
    raise ValueError(f"latent std {std}: the VAE's latents carry no spread (an untrained or collapsed encoder?); "
                     "pin --config.model.autoencoder.scale instead")
  return (float(mean) if center else 0.0), 1.0 / float(std)


def posterior_sampler(ae: autoencoders.AutoencoderConfig, image_channels: int):
  """A jitted (params, uint8 images [N, H, W, C], rng) → raw posterior samples z (shift 0, scale 1)."""
  vae = autoencoders.KLVAE(dataclasses.replace(ae, shift=0.0, scale=1.0), image_channels)
  return jax.jit(lambda params, images, rng: vae.apply({"params": params}, images, rng, method=vae.encode))


def moments(sample_fn, params, batches, max_images: int, seed: int = 0) -> tuple[float, float, int]:
  """(mean, std, images) of the latents of the first `max_images` valid images of packed `batches`,
  accumulated in float64. Every call encodes the same number of images (the last batch is padded) so
  the encoder compiles once."""
  key = jax.random.key(seed)
  total = total_sq = 0.0
  values = images = 0
  width = None
  for i, batch in enumerate(batches):
    flat = np.asarray(batch["images"]).reshape(-1, *batch["images"].shape[2:])
    valid = np.asarray(batch["image_valid"]).reshape(-1)
    width = width or len(flat)
    if len(flat) < width:
      flat = np.concatenate([flat, np.zeros((width - len(flat), *flat.shape[1:]), flat.dtype)])
      valid = np.concatenate([valid, np.zeros(width - len(valid), bool)])
    z = np.asarray(sample_fn(params, flat, jax.random.fold_in(key, i)), np.float64)[valid][:max_images - images]
    total += float(z.sum())
    total_sq += float(np.square(z).sum())
    values += z.size
    images += len(z)
    if images >= max_images:
      break
  if not images:
    raise ValueError("no images in the train split to measure the latent statistics on: check config.data.sources")
  mean = total / values
  return mean, math.sqrt(max(total_sq / values - mean * mean, 0.0)), images


def measure(config, params, step: int, source: str) -> LatentStats:
  """The latent stats of the VAE `params` (config.model.autoencoder's architecture) on the first
  `stats_images` valid images of config's train split (read here by this one process)."""
  from unimm.data import pipeline  # pylint: disable=g-import-not-at-top
  ae = autoencoders.AutoencoderConfig.from_config(config.model.autoencoder)
  if ae.stats_images < 1:
    raise ValueError(f"model.autoencoder.stats_images={ae.stats_images}; measuring the latents needs at least 1")
  d = config.data
  rows = max(1, ENCODE_IMAGES // int(d.max_images_per_row))
  batches = pipeline.build_pipeline(config, "train", 0, 1, num_epochs=1, batch_size=rows, shards=1)
  mean, std, count = moments(posterior_sampler(ae, int(d.image_channels)), params, batches, ae.stats_images,
                             seed=int(config.seed))
  shift, scale = shift_and_scale(mean, std, ae.stats_center)
  return LatentStats(shift=shift, scale=scale, mean=mean, std=std, centered=bool(ae.stats_center), images=count,
                     step=int(step), source=f"{source}; train split of {sorted(d.sources.keys())}")


def record_after_training(config, params, step: int, directory: str) -> LatentStats:
  """End of a kl_vae training run (process 0): measures the final params on the run's own train split and
  stores the stats in its checkpoints `directory` (kept if already measured on this step)."""
  stats = read(directory)
  if stats is not None and stats.step == step:
    return stats
  stats = measure(config, params, step, source="the kl_vae training run, on its final params")
  logging.info("Latent statistics of step %d: mean %.4f, std %.4f over %d images → shift %.4f, scale %.4f; "
               "wrote %s.", step, stats.mean, stats.std, stats.images, stats.shift, stats.scale,
               write(directory, stats))
  return stats


def _ensure_current(config, params, step: int, directory: str) -> None:
  """Process 0 of a consumer: measures and records the stats unless `directory` has them for `step`."""
  stats = read(directory)
  if stats is not None and stats.step == step:
    return
  why = (f"{directory} has no {STATS_FILE}" if stats is None else
         f"{stats_path(directory)} was measured on step {stats.step}, the VAE's latest checkpoint is step {step}")
  logging.warning("%s: measuring the latent shift/scale on this run's train split and recording them there, so "
                  "later consumers of this VAE read the same values (pin --config.model.autoencoder.scale to "
                  "skip this).", why)
  stats = measure(config, params, step, source=f"first use by a {config.model.family} run")
  try:
    path = write(directory, stats)
  except OSError as e:
    raise OSError(f"cannot record the latent statistics in {directory} ({e}): make it writable, or pin the values "
                  f"just measured: --config.model.autoencoder.scale={stats.scale!r} "
                  f"--config.model.autoencoder.shift={stats.shift!r}") from e
  logging.warning("Latent statistics of VAE step %d: mean %.4f, std %.4f over %d images → shift %.4f, scale %.4f; "
                  "wrote %s.", step, stats.mean, stats.std, stats.images, stats.shift, stats.scale, path)


def resolve(config, params, step: int) -> tuple[float, float]:
  """(shift, scale) a consumer of the VAE in config.model.autoencoder.checkpoint diffuses with: pinned
  by the config (scale > 0), else its run's stats, measured and recorded first if missing or older than
  `step` (the checkpoint `params` come from). Every process calls this; process 0 measures and writes."""
  ae = autoencoders.AutoencoderConfig.from_config(config.model.autoencoder)
  pinned = ae.pinned_latent_stats()
  if pinned is not None:
    return pinned
  if jax.process_index() == 0:
    _ensure_current(config, params, step, ae.checkpoint)
  distributed.barrier("latent_stats")
  stats = read(ae.checkpoint)
  if stats is None:
    raise FileNotFoundError(f"{stats_path(ae.checkpoint)} is missing after process 0 wrote it: is "
                            f"{ae.checkpoint} on a filesystem every process sees?")
  logging.info("Latent shift %.4f, scale %.4f from %s (step %d).", stats.shift, stats.scale,
               stats_path(ae.checkpoint), stats.step)
  return stats.shift, stats.scale
