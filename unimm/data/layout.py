"""Layout: a `Document` becomes a row fragment (one document's part of a packed row).

``BOS, text tokens, BOI, <one IMG slot per image token>, EOI, …, EOS``. An
image–caption pair is laid out caption-first (text→image) with probability
`caption_first_prob`, image-first (captioning) otherwise; a text→image caption
is dropped with probability `caption_dropout` (the unconditional case for
classifier-free guidance). An image followed by text gets `image_t_max =
noise_limit_t` (the Transfusion paper's noise limiting, so captioning sees a
recognisable image); otherwise `max_timestep`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from unimm.data import documents
from unimm.data.tokenizer import SpecialIds, Tokenizer


def image_shape_of(data_config) -> tuple[int, int, int]:
  """(H, W, C) of every image under a `config.data` node: square `image_size`, `image_channels`."""
  return int(data_config.image_size), int(data_config.image_size), int(data_config.image_channels)


@dataclasses.dataclass(frozen=True)
class LayoutOptions:
  image_shape: tuple[int, int, int]  # H, W, C that every image must have
  image_slots: int  # sequence slots per image (latent patches or codes)
  caption_first_prob: float = 0.8
  caption_dropout: float = 0.1
  max_timestep: int = 1000
  noise_limit_t: int = 500
  image_token_weight: float = 0.0  # > 0 where image slots are predicted as tokens
  train_read_images: bool = True  # False: image_token_weight only on written images (Janus)
  caption_dropout_mode: str = "drop"  # drop: remove a dropped caption | pad: replace its tokens with PAD

  CONFIG_KEYS = ("image_size", "image_channels", "image_slots", "caption_first_prob", "caption_dropout",
                 "max_timestep", "noise_limit_t", "image_token_weight", "train_read_images", "caption_dropout_mode")

  @classmethod
  def from_config(cls, data_config) -> "LayoutOptions":
    """The options of a `config.data` node (its `CONFIG_KEYS`)."""
    d = data_config
    return cls(
        image_shape=image_shape_of(d),
        image_slots=int(d.image_slots), caption_first_prob=float(d.caption_first_prob),
        caption_dropout=float(d.caption_dropout), max_timestep=int(d.max_timestep),
        noise_limit_t=int(d.noise_limit_t), image_token_weight=float(d.image_token_weight),
        train_read_images=bool(d.train_read_images), caption_dropout_mode=str(d.caption_dropout_mode))

  def __post_init__(self):
    if self.caption_dropout_mode not in ("drop", "pad"):
      raise ValueError(f"data.caption_dropout_mode={self.caption_dropout_mode!r}; expected 'drop' or 'pad'")


def order_pair(doc: documents.Document, opts: LayoutOptions, rng: np.random.Generator) -> documents.Document:
  """An image–caption pair in the order (and with the caption) this example trains on."""
  if not doc.is_pair:
    return doc
  text = next(p for p in doc.parts if isinstance(p, documents.Text))
  image = next(p for p in doc.parts if isinstance(p, documents.Image))
  caption_first = opts.caption_first_prob if doc.caption_first_prob is None else doc.caption_first_prob
  if rng.random() < caption_first:
    if rng.random() < opts.caption_dropout:
      if opts.caption_dropout_mode == "pad":
        return documents.Document((documents.Text(text.text, loss_weight=0.0, as_padding=True), image))
      return documents.Document((image,))
    return documents.Document((text, image))
  return documents.Document((image, text))


def layout_document(doc: documents.Document, tokenizer: Tokenizer, opts: LayoutOptions,
                    rng: np.random.Generator) -> dict | documents.Skipped:
  """The fragment of `doc`: dict of tokens, image_ids (1..n), loss_weights, images, image_t_max,
  image_written."""
  checked = documents.check_document(doc, opts.image_shape)
  if isinstance(checked, documents.Skipped):
    return checked
  doc = order_pair(checked, opts, rng)
  sp: SpecialIds = tokenizer.specials
  token_parts = []
  target_weights = [0.0]  # weight of predicting each token; BOS is never predicted
  images, t_max, written = [], [], []
  text_after = _text_follows(doc.parts)
  for part, followed_by_text in zip(doc.parts, text_after):
    if isinstance(part, documents.Text):
      ids = tokenizer.encode(part.text)
      token_parts.append([sp.pad] * len(ids) if part.as_padding else ids)
      target_weights += [part.loss_weight] * len(ids)
    else:
      images.append(part.as_read() if followed_by_text else part.pixels)  # a read image, or a written one
      t_max.append(opts.noise_limit_t if followed_by_text else opts.max_timestep)
      written.append(not followed_by_text)
      weight = opts.image_token_weight if (opts.train_read_images or not followed_by_text) else 0.0
      token_parts.append(IMAGE)
      # BOI is the text-level choice to start an image: trained like text.
      target_weights += [1.0] + [weight] * (opts.image_slots + 1)
  tokens, image_ids = lay_out(token_parts, sp, opts.image_slots, eos=True)
  target_weights.append(1.0)
  # loss_weights[t] weights the prediction of tokens[t+1] made at t.
  loss_weights = np.zeros(len(tokens), np.float32)
  loss_weights[:-1] = target_weights[1:]
  image_h, image_w, channels = opts.image_shape
  return {
      "tokens": np.asarray(tokens, np.int32),
      "image_ids": np.asarray(image_ids, np.int32),
      "loss_weights": loss_weights,
      "images": (np.stack(images) if images else np.zeros((0, image_h, image_w, channels), np.uint8)),
      "image_t_max": np.asarray(t_max, np.int32),
      "image_written": np.asarray(written, bool),
  }


class _ImagePart:
  def __repr__(self):
    return "IMAGE"


IMAGE = _ImagePart()  # an image among `lay_out`'s parts


def lay_out(parts, specials: SpecialIds, slots: int, *, bos: bool = True, eos: bool = False
            ) -> tuple[list[int], list[int]]:
  """A document's token ids and image ids: BOS, then each part (text token ids as they are; `IMAGE`: BOI,
  `slots` IMG slots with image id k for the document's k-th image, EOI), then EOS. Every row a model
  reads is laid out here: training documents, prompts, caption rows."""
  tokens = [specials.bos] if bos else []
  image_ids = [0] * len(tokens)
  k = 0
  for part in parts:
    if part is IMAGE:
      k += 1
      tokens += [specials.boi] + [specials.img] * slots + [specials.eoi]
      image_ids += [0] + [k] * slots + [0]
    else:
      tokens += list(part)
      image_ids += [0] * len(part)
  if eos:
    tokens.append(specials.eos)
    image_ids.append(0)
  return tokens, image_ids


def _text_follows(parts) -> list[bool]:
  """For each part: does a non-empty text part come after it?"""
  out, seen = [], False
  for part in reversed(parts):
    out.append(seen)
    seen |= isinstance(part, documents.Text) and bool(part.text)
  return out[::-1]
