"""The generators of a family: one place that maps a task to its image and text generators.

Every family's generators take the same prompts (`unimm.inference.prompts`) and are called the
same way (`image.generate(prompts, rng, guidance=…, num_steps=…, sampler=…)`, `text.generate(…)`,
`text.generate_mixed(…)`), so the sample and eval commands, the trainer's sample grid and the
benchmarks never branch on the family.
"""

from __future__ import annotations

from unimm.inference import codes, images, text
from unimm.models import chameleon


def _is_code_family(task) -> bool:
  return isinstance(task, chameleon.ChameleonTask)


def _code_options(code_sampling) -> codes.CodeSampling:
  if code_sampling is None:
    return codes.CodeSampling()
  return codes.CodeSampling(temperature=code_sampling.temperature, top_k=code_sampling.top_k,
                            top_p=code_sampling.top_p)


def image_generator(task, params, specials, placement=None, code_sampling: text.SamplingOptions | None = None):
  """`code_sampling`: temperature / top-k / top-p over image codes (code families; default temperature 1)."""
  if _is_code_family(task):
    return codes.CodeImageGenerator(task, params, specials, placement, _code_options(code_sampling))
  return images.ImageGenerator(task, params, specials, placement)


def text_generator(task, params, specials, placement=None, code_sampling: text.SamplingOptions | None = None):
  if _is_code_family(task):
    return codes.CodeTextGenerator(task, params, specials, placement, _code_options(code_sampling))
  return text.TextGenerator(task, params, specials, placement)


def generates_images(task) -> bool:
  """Whether the task writes images (the tokenizer/autoencoder families do not)."""
  return hasattr(task, "model") and hasattr(task.model, "slots")
