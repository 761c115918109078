"""The input pipeline: sources → mixture → layout → packing → per-host batches.

Per source: read (ArrayRecord through TFDS or `prepare`'s files), shuffle with
the run's seed, take this host's disjoint shard (``[process_index::process_count]``),
repeat (reshuffled each epoch) for training. Sources are mixed by weight
(documents drawn in proportion), laid out with a per-element seeded RNG (so a
restored iterator reproduces caption order and dropout), packed into rows of
`seq_len`, and batched to the per-host batch. Everything before packing is
random access, so the iterator state is small and exact.

Config (`config.data`): see `configs/transfusion/tiny.py` for every key. A source entry may
also say `text_only=True` (use only its text) or `caption_first_prob=p` (this source's pair order),
which is how a Janus stage mixes understanding, text and generation data from one dataset.
"""

from __future__ import annotations

import dataclasses

import grain

from unimm.data import documents, layout, packing, sources
from unimm.data.tokenizer import Tokenizer


def tokenizer_path(data_config) -> str:
  return data_config.tokenizer.path.format(data_dir=data_config.data_dir)


def load_tokenizer(data_config) -> Tokenizer:
  return Tokenizer.load(tokenizer_path(data_config))


class _SourceView(grain.transforms.Map):
  """A source's documents as its config entry asks: `text_only` keeps only the text (pure-text data from
  a captioned dataset); `caption_first_prob` fixes the pair order for this source (1: all generation
  data, 0: all understanding data), e.g. for a Janus stage's understanding : text : generation mix."""

  def __init__(self, text_only: bool, caption_first_prob: float | None):
    self._text_only, self._caption_first_prob = text_only, caption_first_prob

  def map(self, element):
    if isinstance(element, documents.Skipped):
      return element
    if self._text_only:
      texts = tuple(p for p in element.parts if isinstance(p, documents.Text))
      return documents.Document(texts) if texts else documents.Skipped(documents.EMPTY, "no text in a text_only source")
    if element.is_pair and self._caption_first_prob is not None:
      return dataclasses.replace(element, caption_first_prob=self._caption_first_prob)
    return element


class _Layout(grain.transforms.RandomMap):
  """Lays out one document with the element's own RNG (picklable for workers)."""

  def __init__(self, tokenizer: Tokenizer, opts: layout.LayoutOptions):
    self._tokenizer, self._opts = tokenizer, opts

  def random_map(self, element, rng):
    if isinstance(element, documents.Skipped):
      return element  # passes through to the packer, which counts it
    return layout.layout_document(element, self._tokenizer, self._opts, rng)


def mixture(data_config, split: str, *, process_index: int, process_count: int, seed: int,
            num_epochs: int | None) -> grain.MapDataset:
  """The weighted mixture of this host's shards of every source: `Document | Skipped`."""
  names = sorted(data_config.sources.keys())
  if not names:
    raise ValueError("config.data.sources is empty; name at least one source.")
  datasets, weights = [], []
  for i, name in enumerate(names):
    spec = data_config.sources[name]
    weight = float(spec.get("weight", 1.0))
    if weight <= 0:
      continue
    ds = sources.open_source(spec, split, data_config.data_dir)
    text_only, caption_first = bool(spec.get("text_only", False)), spec.get("caption_first_prob", None)
    if text_only or caption_first is not None:
      ds = ds.map(_SourceView(text_only, None if caption_first is None else float(caption_first)))
    if seed is not None:
      ds = ds.shuffle(seed=seed + 7919 * i)
    ds = ds[process_index::process_count]
    if num_epochs != 1:
      ds = ds.repeat(num_epochs)
    datasets.append(ds)
    weights.append(weight)
  if not datasets:
    raise ValueError(f"every source in config.data.sources ({names}) has weight 0.")
  return datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)


def build_dataset(config, split: str, process_index: int = 0, process_count: int = 1, *,
                  num_epochs: int | None = None, shuffle: bool = True,
                  batch_size: int | None = None) -> grain.IterDataset:
  """This host's dataset of packed batches (numpy dicts, see `unimm.data.packed`).

  `num_epochs=None` repeats forever (training); evaluation passes 1 and
  `shuffle=False`. `batch_size` is per host; it defaults to the global
  `config.data.batch_size` divided by `process_count`.
  """
  d = config.data
  if batch_size is None:
    if d.batch_size % process_count:
      raise ValueError(f"config.data.batch_size={d.batch_size} does not split over {process_count} processes.")
    batch_size = d.batch_size // process_count
  tokenizer = load_tokenizer(d)
  opts = layout.LayoutOptions.from_config(d)
  seed = int(config.seed) if shuffle else None
  docs = mixture(d, split, process_index=process_index, process_count=process_count,
                 seed=seed, num_epochs=num_epochs)
  fragments = docs.random_map(_Layout(tokenizer, opts), seed=int(config.seed))
  it = fragments.to_iter_dataset(grain.ReadOptions(
      num_threads=int(d.read_threads), prefetch_buffer_size=int(d.read_prefetch)))
  rows = packing.PackIterDataset(
      it, seq_len=int(d.seq_len), max_images=int(d.max_images_per_row), image_shape=opts.image_shape,
      pad_id=tokenizer.specials.pad, num_bins=int(d.packing_bins))
  batches = rows.batch(batch_size, drop_remainder=num_epochs is None)
  if int(d.worker_count) > 0:
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(d.worker_count)))
  return batches


def build_pipeline(config, split: str, process_index: int = 0, process_count: int = 1,
                   **kwargs) -> grain.DatasetIterator:
  """An iterator over this host's packed batches; its state saves with orbax (grain's args)."""
  return iter(build_dataset(config, split, process_index, process_count, **kwargs))
