"""Text (and mixed-modal) generation with a KV cache: prefill the prompts once, then one token at a time.

Prompts (`unimm.inference.prompts`) may hold images, read clean. They are
left-padded into one batch and each row keeps its own positions. Sampling:
greedy (temperature 0), temperature, top-k, top-p. A row stops at EOS or after
its token budget; the loop ends when every row has. In `generate_mixed`, a BOI
the model emits starts an image (Transfusion's mode switch): while it is
denoised the other rows wait, writing padding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from unimm.data import packed
from unimm.inference import cache as cache_lib, images as images_lib, placement as placement_lib
from unimm.inference import prompts as prompts_lib
from unimm.inference.sampling import SamplingOptions


def sample_tokens(logits, rng, opts: SamplingOptions):
  """Next token ids [B] from logits [B, V], drawn as `opts` says (every field of `SamplingOptions` is
  applied here)."""
  logits = logits.astype(jnp.float32)
  if opts.temperature <= 0:
    return jnp.argmax(logits, axis=-1)
  logits = logits / opts.temperature
  if opts.top_k:
    kth = jax.lax.top_k(logits, opts.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if opts.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    sorted_logits = jnp.where(before >= opts.top_p, -jnp.inf, sorted_logits)
    logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
  return jax.random.categorical(rng, logits, axis=-1)


def mask_id_range(logits, start: int, stop: int):
  """Logits [B, V] with ids in [start, stop) ruled out: the padding rows of a vocabulary rounded up past
  the tokenizer's ids (`families.text_vocabulary`), which no tokenizer can decode. start 0: nothing."""
  if not 0 < start < stop:
    return logits
  ids = jnp.arange(logits.shape[-1])
  return jnp.where((ids >= start) & (ids < stop), -jnp.inf, logits)


def mask_generator_tokens(logits, specials, images_full):
  """Logits [B, V] with EOI, IMG and PAD ruled out, and BOI where images_full [B]."""
  ids = jnp.arange(logits.shape[-1])
  never = (ids == specials.eoi) | (ids == specials.img) | (ids == specials.pad)
  return jnp.where(never | (images_full[:, None] & (ids == specials.boi)), -jnp.inf, logits)


def image_closing_rows(batch: int, rows, row_tokens, next_pos, image_count, pad: int) -> packed.Rows:
  """Step rows that write, for each of `rows`, its new image's slots and EOI (`row_tokens`
  [len(rows), slots + 1]) at its next positions; every other row writes padding (segment 0)."""
  width = row_tokens.shape[1]
  documents = [([], [])] * batch
  for r, tokens in zip(rows, row_tokens):
    documents[r] = (tokens, [image_count[r] + 1] * (width - 1) + [0])
  return packed.Rows.padded(documents, width, pad, first_positions=next_pos)


@dataclasses.dataclass
class Generation:
  tokens: list[int]  # generated ids (EOS included when reached); a generated image is a BOI, EOI pair here
  images: list[np.ndarray]  # uint8 [H, W, C], one per BOI in `tokens`, in order


@dataclasses.dataclass(frozen=True)
class ImageEvent:
  """Rows that just wrote BOI mid-generation: what a stepper needs to draw their images."""
  rows: np.ndarray  # their indices in the batch
  filled: int  # the cache's next write slot, shared by all rows
  next_pos: np.ndarray  # [B] each row's next position
  image_count: np.ndarray  # [B] images each row holds: the new image's index
  logits: jax.Array  # [B, V] next-token logits after BOI


class DiffusionStepper:
  """A Transfusion-style task's steps for `TextGenerator`: text through the KV-cached model, and an image
  denoised against the cached prefix (with guidance), then written into the cache clean.

  Every family's stepper has this interface: `model` (in decode mode), `placement`, `specials`,
  `draws_images_always`, `padding_ids`, `prefill`, `feed`, `mask` and `draw_images`
  (`unimm.inference.codes.CodeStepper` for image-code families).
  """

  draws_images_always = False  # True: a sampled BOI always starts an image, even in `generate`

  def __init__(self, task, params, specials, placement: placement_lib.Placement | None = None):
    self.task = task
    self.model = dataclasses.replace(task.model, decode=True)
    self.placement = placement or placement_lib.Placement.single_device()
    self.params = self.placement.params(self.model, params)
    self.specials = specials
    self._images = None
    self._step_jit = jax.jit(self._step_fn, donate_argnums=1)  # the cache is updated in place
    self._encode = jax.jit(task.encode_images)  # the frozen autoencoder compiled, not run op by op

  @property
  def padding_ids(self) -> tuple[int, int]:
    """[start, stop): the vocabulary's padding ids past the tokenizer's, never sampled."""
    return self.task.tokenizer_ids, self.model.vocab_size

  def _step_fn(self, params, cache, rows, latents):
    t = jnp.zeros((rows.tokens.shape[0], self.model.max_images), jnp.int32)  # images a row reads are clean
    (logits, _), mutated = self.model.apply({"params": params, "cache": cache}, rows, latents, t,
                                            mutable=["cache"])
    return logits[:, -1], mutated["cache"]

  def _step(self, cache, rows: packed.Rows, latents):
    with self.placement.context():
      return self._step_jit(self.params, cache, rows, latents)

  def prefill(self, cache, rows: packed.Rows, images):
    """Logits after each prompt row and the cache holding the prompts (and their `images`)."""
    with self.placement.context():
      latents = self._encode(self.placement.rows(images))
      return self._step(cache, self.placement.rows(rows), latents)

  def feed(self, cache, rows: packed.Rows):
    """One text step (no image inputs)."""
    b = rows.tokens.shape[0]
    return self._step(cache, rows, jnp.zeros((b, self.model.max_images, *self.model.latent_shape), jnp.float32))

  def mask(self, logits, images_full):
    """The logits a row may sample from while drawing images is on."""
    return mask_generator_tokens(logits, self.specials, images_full)

  def draw_images(self, cache, event: ImageEvent, rng, diffusion: images_lib.DiffusionOptions):
    """Denoises an image for each of `event.rows`, then writes it clean and EOI into the cache (other rows
    write padding): (the rows' uint8 images, the next logits, the cache)."""
    s, b, rows = self.specials, len(event.next_pos), event.rows
    m, slots = self.model.max_images, self.model.slots
    if self._images is None:
      self._images = images_lib.ImageGenerator(self.task, self.params, s, self.placement)
    padded = np.array(placement_lib.pad_to_multiple(list(rows), self.placement.batch_multiple, rows[0]))
    k = len(padded)
    rows_cache = cache_lib.take_rows(cache, padded)
    first_slot, image_index = event.next_pos[padded], event.image_count[padded]
    if diffusion.guidance is not None:
      # The unconditional twins, `BOS BOI` written at the cache's current end (earlier slots: segment 0).
      uncond = cache_lib.with_index(cache_lib.empty(self.model, k, cache_lib.length(cache), self.placement),
                                    event.filled - 2)
      twins = packed.Rows.padded([([s.bos, s.boi], [0, 0])] * k, 2, s.pad)
      _, uncond = self._step(uncond, twins, jnp.zeros((k, m, *self.model.latent_shape), jnp.float32))
      rows_cache = cache_lib.concat_rows(rows_cache, uncond)
      first_slot = np.concatenate([first_slot, np.full(k, 2)])
      image_index = np.concatenate([image_index, np.zeros(k, np.int64)])
    x = self._images.denoise(rows_cache, first_slot, image_index, rng, diffusion)[:len(rows)]
    pictures = list(self._images.to_pixels(x))
    closing = image_closing_rows(b, rows, np.tile([s.img] * slots + [s.eoi], (len(rows), 1)), event.next_pos,
                                 event.image_count, s.pad)
    latents = jnp.zeros((b, m, *self.model.latent_shape), jnp.float32).at[
        jnp.asarray(rows), jnp.asarray(event.image_count[rows])].set(x)
    return (pictures, *self._step(cache, closing, latents))


class TextGenerator:
  """Continues prompts, KV-cached, with a family's `stepper` (`DiffusionStepper`, `codes.CodeStepper`);
  `generate_mixed` also draws images."""

  def __init__(self, stepper):
    self.stepper = stepper
    self.model, self.specials, self.placement = stepper.model, stepper.specials, stepper.placement

  def generate(self, prompts: list[prompts_lib.Prompt], *, max_new_tokens: int | list[int], rng=None,
               options: SamplingOptions = SamplingOptions()) -> list[list[int]]:
    """The generated ids of each prompt (EOS included when reached); BOI is an ordinary token here (unless
    the stepper `draws_images_always`)."""
    return [g.tokens for g in self._generate(prompts, max_new_tokens, rng, options, None)]

  def generate_mixed(self, prompts: list[prompts_lib.Prompt], *, max_new_tokens: int | list[int], rng=None,
                     options: SamplingOptions = SamplingOptions(),
                     diffusion: images_lib.DiffusionOptions = images_lib.DiffusionOptions()) -> list[Generation]:
    """Text and images, as the model chooses: when a row emits BOI its image is drawn against the cached
    prefix (with guidance: `diffusion.guidance`; the other fields are diffusion settings, unused by code
    families), written into the cache, closed with EOI, and text goes on.

    `max_new_tokens` counts tokens (BOI and EOI included), not image slots. The tokens only the
    generator writes (EOI, image slots, padding) are never sampled, nor BOI in a row that already
    holds the model's `max_images` images.
    """
    return self._generate(prompts, max_new_tokens, rng, options, diffusion)

  def _generate(self, prompts, max_new_tokens, rng, options, diffusion) -> list[Generation]:
    s, n, stepper = self.specials, len(prompts), self.stepper
    m, slots = self.model.max_images, self.model.slots
    budget = np.broadcast_to(np.asarray(max_new_tokens), (n,)).astype(np.int64)
    prompts = placement_lib.pad_to_multiple(list(prompts), self.placement.batch_multiple,
                                            prompts_lib.Prompt([s.bos], [0], []))
    budget = np.concatenate([budget, np.zeros(len(prompts) - n, np.int64)])
    b = len(prompts)
    rows, images = prompts_lib.batch(prompts, pad_id=s.pad, max_images=m, image_shape=stepper.task.image_shape)
    filled = rows.tokens.shape[1]  # the cache's next write slot, shared by all rows
    cache = cache_lib.empty(self.model, b, cache_lib.bucket(filled + int(budget.max())), self.placement)
    logits, cache = stepper.prefill(cache, rows, images)
    rng = jax.random.key(0) if rng is None else rng
    drawing = diffusion is not None or stepper.draws_images_always
    next_pos = np.array([len(p) for p in prompts], np.int32)
    image_count = np.array([len(p.images) for p in prompts])
    done = budget <= 0
    out = [Generation([], []) for _ in range(b)]
    while not done.all():
      rng, sub, image_rng = jax.random.split(rng, 3)
      logits = mask_id_range(logits, *stepper.padding_ids)
      if drawing:
        logits = stepper.mask(logits, jnp.asarray(image_count >= m))
      new = np.asarray(sample_tokens(logits, sub, options))
      for i in np.nonzero(~done)[0]:
        out[i].tokens.append(int(new[i]))
      starting = ~done & (new == s.boi) if drawing else np.zeros(b, bool)
      done |= (new == s.eos) | (np.array([len(o.tokens) for o in out]) >= budget)
      feed = ~done | starting
      if not feed.any():
        break
      tokens = np.where(feed, new, s.pad)[:, None].astype(np.int32)
      # A copy: on CPU a numpy argument may be used in place, after the `+=` below (async dispatch).
      step_rows = packed.Rows(tokens, next_pos[:, None].copy(), feed.astype(np.int32)[:, None],
                              np.zeros((b, 1), np.int32))
      logits, cache = stepper.feed(cache, step_rows)
      filled += 1
      next_pos += feed
      if starting.any():
        remaining = int((budget - [len(o.tokens) for o in out]).max(initial=0))
        if filled + slots + 1 + remaining > cache_lib.length(cache):
          cache = cache_lib.grow(cache, cache_lib.bucket(filled + slots + 1 + remaining))
        event = ImageEvent(np.nonzero(starting)[0], filled, next_pos, image_count, logits)
        pictures, new_logits, cache = stepper.draw_images(cache, event, image_rng, diffusion)
        for r, pixels in zip(event.rows, pictures):
          out[r].images.append(pixels)
          out[r].tokens.append(s.eoi)
        logits = jnp.where(jnp.asarray(starting)[:, None], new_logits, logits)
        filled += slots + 1
        next_pos += np.where(starting, slots + 1, 0).astype(np.int32)
        image_count += starting
    return out[:n]
