"""Generation for families that write images as VQ codes (Chameleon, Janus), KV-cached.

The family's task says how prompt rows enter its model (`task.model_inputs`)
and what its unconditional prompt is (`task.unconditional_prompt`: Chameleon
`[BOS, BOI]`; Janus the prompt with its text replaced by PAD). Janus reuses
this file unchanged: its logits are its LM and image heads' side by side.

Modality-constrained decoding: outside an image the image codes (and the
tokens only the generator writes: IMG, EOI, PAD) are masked out; after `BOI`
only image codes may be sampled, exactly `slots` of them in raster order,
then `EOI` is forced. Images use classifier-free guidance: each conditional
row has an unconditional twin run in the same batch, and the code logits are
`l_u + s·(l_c − l_u)`; then temperature / top-k / top-p over the codes. The codes go through the frozen VQ decoder.

`CodeImageGenerator.generate` is text→image (the prompt, then an image);
`unimm.inference.text.TextGenerator` with a `CodeStepper` writes text, and an
image whenever the model emits `BOI`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from unimm.data import packed
from unimm.inference import cache as cache_lib, placement as placement_lib, prompts as prompts_lib
from unimm.inference import sampling, text as text_lib


@dataclasses.dataclass(frozen=True)
class CodeSampling(sampling.SamplingOptions):
  """How image codes are drawn: the token options (at temperature 1 by default: `CODE_DEFAULTS`) and the
  classifier-free guidance scale (None: conditional only)."""
  temperature: float = sampling.CODE_DEFAULTS.temperature
  guidance: float | None = 3.0


def mask_text(logits, text_vocab: int, specials, images_full, image_tokens: tuple[int, int] = (0, 0)):
  """Outside images: no image code, no IMG/EOI/PAD, no text id in `image_tokens` ([start, stop): a
  converted Chameleon's image tokens), and no BOI where a row holds its last image."""
  ids = jnp.arange(logits.shape[-1])
  never = (ids >= text_vocab) | (ids == specials.eoi) | (ids == specials.img) | (ids == specials.pad)
  never |= (ids >= image_tokens[0]) & (ids < image_tokens[1])
  return jnp.where(never | (images_full[:, None] & (ids == specials.boi)), -jnp.inf, logits)


def mask_codes(logits, text_vocab: int):
  """Inside an image: image codes only."""
  return jnp.where(jnp.arange(logits.shape[-1]) >= text_vocab, logits, -jnp.inf)


def guided(logits, guidance: float | None):
  """[2N, V] rows (conditional; unconditional) → [N, V] guided logits (N rows as given when guidance is None)."""
  if guidance is None:
    return logits
  cond, uncond = jnp.split(logits, 2)
  return uncond + guidance * (cond - uncond)


class CodeStepper:
  """A code family's KV-cached steps: the generation loop's (`unimm.inference.text.TextGenerator`, with
  `DiffusionStepper`'s interface) and drawing one image's codes against a cache (`draw`, also used by
  `CodeImageGenerator`)."""

  draws_images_always = True  # after BOI only codes are allowed, so a BOI always becomes an image

  def __init__(self, task, params, specials, placement: placement_lib.Placement | None = None,
               options: CodeSampling = CodeSampling()):
    self.task = task
    self.model = dataclasses.replace(task.model, decode=True)
    self.placement = placement or placement_lib.Placement.single_device()
    self.params = self.placement.params(self.model, params)
    self.specials = specials
    self.options = options

    def step(params, cache, *inputs):
      logits, mutated = self.model.apply({"params": params, "cache": cache}, *inputs, mutable=["cache"])
      return logits[:, -1], mutated["cache"]
    self._step_jit = jax.jit(step, donate_argnums=1)

    # The family's model inputs for prompt rows: e.g. the frozen tokenizer's codes in image slots (Chameleon).
    self._model_inputs = jax.jit(self.task.model_inputs)
    self._decode = jax.jit(self.task.codes.decode)

  @property
  def padding_ids(self) -> tuple[int, int]:
    return self.task.tokenizer_ids, self.task.codes.text_vocab  # codes follow the padded text vocabulary

  def _step(self, cache, *inputs):
    """One step of the model's inputs (`packed.Rows`, and images for a family that reads them)."""
    with self.placement.context():
      return self._step_jit(self.params, cache, *inputs)

  def prefill(self, cache, rows: packed.Rows, images):
    with self.placement.context():
      inputs = self._model_inputs(*self.placement.rows((rows, images)))
    return self._step(cache, *inputs)

  def feed(self, cache, rows: packed.Rows):
    """One text step."""
    return self._step(cache, rows)

  def mask(self, logits, images_full):
    return mask_text(logits, self.task.codes.text_vocab, self.specials, images_full,
                     getattr(self.task, "image_token_range", (0, 0)))

  def draw(self, cache, logits, first_slot: np.ndarray, image_index: np.ndarray, rng,
           options: CodeSampling) -> np.ndarray:
    """Code tokens [N, slots] for a cache of rows written up to their `BOI` (2N rows, conditional then
    unconditional, when guided) whose next-token logits are `logits`. The cache is consumed."""
    b, slots = len(first_slot), self.model.slots
    text_vocab = self.task.codes.text_vocab
    if options.guidance is not None and b % 2:
      raise ValueError(f"guided drawing takes conditional and unconditional rows in pairs, got {b} rows")
    codes = []
    ones = np.ones((b, 1), np.int32)
    image_ids = (np.asarray(image_index)[:, None] + 1).astype(np.int32)
    for s in range(slots):
      rng, sub = jax.random.split(rng)
      step_logits = mask_codes(guided(logits, options.guidance), text_vocab)
      new = text_lib.sample_tokens(step_logits, sub, options)
      codes.append(new)
      if s + 1 < slots:
        feed = new if options.guidance is None else jnp.concatenate([new, new])
        logits, cache = self._step(cache, packed.Rows(feed[:, None].astype(jnp.int32),
                                                      (np.asarray(first_slot)[:, None] + s).astype(np.int32), ones,
                                                      image_ids))
    return np.asarray(jnp.stack(codes, axis=1))

  def uncond_prompt(self, prompt: prompts_lib.Prompt) -> prompts_lib.Prompt:
    """The guidance twin of `prompt` (which ends in BOI), as the family trained its unconditional case."""
    tokens = self.task.unconditional_prompt(len(prompt), self.specials)
    return prompts_lib.Prompt(tokens, [0] * len(tokens), [])

  def uncond_twins(self, prefix_lengths, length: int, index: int):
    """The twins of rows whose documents hold `prefix_lengths` tokens up to their BOI, left-padded to end at
    `index` of an empty cache of `length` slots: (logits, cache, the twins' lengths)."""
    s = self.specials
    twins = [self.uncond_prompt(prompts_lib.Prompt([s.pad] * int(n), [0] * int(n), [])) for n in prefix_lengths]
    rows, _ = prompts_lib.batch(twins, pad_id=s.pad, max_images=self.model.max_images,
                                image_shape=self.task.image_shape, multiple=1)
    width = rows.tokens.shape[1]
    cache = cache_lib.with_index(cache_lib.empty(self.model, len(twins), length, self.placement), index - width)
    logits, cache = self._step(cache, rows)
    return logits, cache, np.array([len(t) for t in twins])

  def to_pixels(self, code_tokens) -> np.ndarray:
    return np.asarray(self._decode(jnp.asarray(code_tokens)))

  def draw_images(self, cache, event: text_lib.ImageEvent, rng, diffusion):
    """Draws each of `event.rows`' image against a copy of their cache (guided by `diffusion.guidance`, or
    this stepper's options without `diffusion`), then writes the codes and EOI into the cache (other rows
    write padding): (the rows' uint8 images, the next logits, the cache)."""
    s, b, rows = self.specials, len(event.next_pos), event.rows
    guidance = diffusion.guidance if diffusion is not None else self.options.guidance
    options = dataclasses.replace(self.options, guidance=guidance)
    padded = np.array(placement_lib.pad_to_multiple(list(rows), self.placement.batch_multiple, rows[0]))
    k = len(padded)
    rows_cache, rows_logits = cache_lib.take_rows(cache, padded), event.logits[jnp.asarray(padded)]
    first_slot, image_index = event.next_pos[padded], event.image_count[padded]
    if guidance is not None:
      twin_logits, twins, twin_lengths = self.uncond_twins(first_slot, cache_lib.length(cache), event.filled)
      rows_cache = cache_lib.concat_rows(rows_cache, twins)
      rows_logits = jnp.concatenate([rows_logits, twin_logits])
      first_slot = np.concatenate([first_slot, twin_lengths])
      image_index = np.concatenate([image_index, np.zeros(k, np.int64)])
    codes = self.draw(rows_cache, rows_logits, first_slot, image_index, rng, options)[:len(rows)]
    pictures = list(self.to_pixels(codes))
    closing = text_lib.image_closing_rows(b, rows, np.concatenate([codes, np.full((len(rows), 1), s.eoi)], axis=1),
                                          event.next_pos, event.image_count, s.pad)
    return (pictures, *self._step(cache, closing))


class CodeImageGenerator:
  """Text→image for a code family: prompt + `BOI`, then `slots` guided codes, decoded."""

  def __init__(self, task, params, specials, placement: placement_lib.Placement | None = None,
               options: CodeSampling = CodeSampling()):
    self.steps = CodeStepper(task, params, specials, placement, options)

  def generate(self, prompts: list[prompts_lib.Prompt], rng, *, guidance: float | None = 3.0, num_steps=None,
               sampler=None) -> np.ndarray:
    """uint8 images [N, H, W, C], one per prompt. `num_steps`/`sampler` are diffusion settings (the same
    call serves every family); codes are sampled with this generator's `options` and `guidance`."""
    del num_steps, sampler
    return self.steps.to_pixels(self.code_tokens(prompts, rng, guidance=guidance))

  def code_tokens(self, prompts: list[prompts_lib.Prompt], rng, *, guidance: float | None = 3.0) -> np.ndarray:
    """The code tokens [N, slots] (`text_vocab + c`) drawn for each prompt's image."""
    steps = self.steps
    options = dataclasses.replace(steps.options, guidance=guidance)
    s, n = steps.specials, len(prompts)
    m, slots = steps.model.max_images, steps.model.slots
    prompts = placement_lib.pad_to_multiple(list(prompts), steps.placement.batch_multiple,
                                            prompts_lib.Prompt([s.bos], [0], []))
    cond = [prompts_lib.Prompt(p.tokens + [s.boi], p.image_ids + [0], p.images) for p in prompts]
    uncond = [steps.uncond_prompt(p) for p in cond] if guidance is not None else []
    both = cond + uncond
    new_image = np.array([len(p.images) for p in both])
    if (new_image >= m).any():
      raise ValueError(f"a prompt already holds {int(new_image.max())} images; the model takes {m} per row")
    rows, images = prompts_lib.batch(both, pad_id=s.pad, max_images=m, image_shape=steps.task.image_shape)
    cache = cache_lib.empty(steps.model, len(both), cache_lib.bucket(rows.tokens.shape[1] + slots), steps.placement)
    logits, cache = steps.prefill(cache, rows, images)
    return np.asarray(steps.draw(cache, logits, np.array([len(p) for p in both]), new_image, rng, options))[:n]
