"""The input pipeline: sources → mixture → layout → packing → per-host batches.

Per source: read (ArrayRecord through TFDS or `prepare`'s files), shuffle with
the run's seed, take each of this host's data shards (``[shard::shards]``, one or more per host),
repeat (reshuffled each epoch) for training. Sources are mixed by weight
(documents drawn in proportion), laid out with a per-element seeded RNG (so a
restored iterator reproduces caption order and dropout), packed into rows of
`seq_len` (a document longer than a row is split into chunks, see `packing`),
and batched to the per-host batch. Everything before packing is random access,
so the iterator state is small and exact.

Config (`config.data`, parsed once per pipeline into `settings.DataSettings`): see `configs/common.py` for every
key. A source entry may also say `text_only=True` (use only its text) or `caption_first_prob=p` (this
source's pair order), which is how a Janus stage mixes understanding, text and generation data from one
dataset.
"""

from __future__ import annotations

import collections
import dataclasses

from absl import logging
import grain
import numpy as np

from unimm.data import documents, layout, packing, sources
from unimm.data.settings import DataSettings
from unimm.data import tokenizer as tokenizer_lib
from unimm.data.tokenizer import Tokenizer


def tokenizer_path(data_config) -> str:
  return data_config.tokenizer.path.format(data_dir=data_config.data_dir)


def load_tokenizer(data_config):
  """The run's tokenizer: sentencepiece, or Hugging Face's tokenizer.json with `tokenizer.special_tokens`
  (role → token, e.g. {"img": "<image_placeholder>"}) mapping a converted model's own specials."""
  specials = {role: token for role, token in dict(data_config.tokenizer.get("special_tokens") or {}).items() if token}
  return tokenizer_lib.load(tokenizer_path(data_config), specials or None)


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


def _concatenate(batches: list):
  if isinstance(batches[0], dict):
    return {k: _concatenate([b[k] for b in batches]) for k in batches[0]}
  return np.concatenate(batches)


class _ShardsIterator(grain.DatasetIterator):
  """Batches of several data shards side by side (rows of shard 0, then shard 1, ...)."""

  def __init__(self, parents):
    super().__init__(parents)

  def __next__(self):
    return _concatenate([next(p) for p in self._parents])

  def get_state(self):
    return {"shards": [p.get_state() for p in self._parents]}

  def set_state(self, state):
    for p, s in zip(self._parents, state["shards"], strict=True):
      p.set_state(s)


class _Shards(grain.IterDataset):

  def __iter__(self):
    return _ShardsIterator([iter(p) for p in self._parents])


class _Layout(grain.transforms.RandomMap):
  """Lays out one document with the element's own RNG (picklable for workers)."""

  def __init__(self, tokenizer: Tokenizer, opts: layout.LayoutOptions):
    self._tokenizer, self._opts = tokenizer, opts

  def random_map(self, element, rng):
    if isinstance(element, documents.Skipped):
      return element  # passes through to the packer, which counts it
    return layout.layout_document(element, self._tokenizer, self._opts, rng)


def mean_document_tokens(ds: grain.MapDataset, tokenizer: Tokenizer, opts: layout.LayoutOptions,
                         sample: int = 256) -> float:
  """The mean laid-out length of a source's first `sample` documents (skipped records not counted).
  Read before shuffling and sharding, so every host finds the same value."""
  rng = np.random.default_rng(0)  # pair order and caption dropout, as the layout draws them
  lengths = []
  for i in range(min(sample, len(ds))):
    doc = ds[i]
    fragment = doc if isinstance(doc, documents.Skipped) else layout.layout_document(doc, tokenizer, opts, rng)
    if isinstance(fragment, dict):
      lengths.append(len(fragment["tokens"]))
  if not lengths:
    raise ValueError(f"none of the first {sample} records of a source lays out as a document: its token share "
                     "cannot be measured (data.mix_by='tokens'); check the source")
  return float(np.mean(lengths))


def check_source(name: str, ds: grain.MapDataset, split: str, image_shape, warn_rate: float,
                 sample: int = 64) -> None:
  """Fails at start-up naming a source that holds no records, or whose sampled records are all skipped
  (training would wait forever for a row); warns when more than `warn_rate` of them are."""
  if len(ds) == 0:
    raise ValueError(f"source {name!r} has no records in split {split!r}: check its path / dataset, or give it "
                     f"weight 0 (--config.data.sources.{name}.weight=0)")
  reasons = collections.Counter()
  indices = np.unique(np.linspace(0, len(ds) - 1, min(sample, len(ds))).astype(int))
  for i in indices:
    doc = ds[int(i)]
    if isinstance(doc, documents.Document):
      doc = documents.check_document(doc, image_shape)
    if isinstance(doc, documents.Skipped):
      reasons[doc.reason] += 1
  skipped = sum(reasons.values())
  if skipped == len(indices):
    raise ValueError(f"source {name!r}: all {skipped} records sampled from split {split!r} are skipped "
                     f"({dict(reasons)}); with images of {list(image_shape)} expected, check data.image_size / "
                     "data.image_channels against how the source was prepared")
  if skipped > warn_rate * len(indices):
    logging.warning("Source %r: %d of %d records sampled from split %r are skipped (%s); training will read the rest. "
                    "Check data.image_size / data.image_channels against how it was prepared.", name, skipped,
                    len(indices), split, dict(reasons))


def mixture(d: DataSettings, split: str, *, shard: int, shards: int, seed: int, num_epochs: int | None,
            tokenizer: Tokenizer | None = None) -> grain.MapDataset:
  """The weighted mixture of one data shard of every source: `Document | Skipped`.

  `data.mix_by='documents'`: a source's weight is its share of documents. `'tokens'`: its share of
  tokens (the Transfusion paper's 1:1 text : image-caption tokens); each source's document weight is then
  weight / its mean laid-out document length (`mean_document_tokens`, needs `tokenizer`).
  """
  by_tokens = d.mix_by == "tokens"
  names = sorted(d.sources.keys())
  if not names:
    raise ValueError("config.data.sources is empty; name at least one source.")
  datasets, weights = [], []
  for i, name in enumerate(names):
    spec = d.sources[name]
    weight = float(spec.get("weight", 1.0))
    if weight <= 0:
      continue
    ds = sources.open_source(spec, split, d.data_dir)
    text_only, caption_first = bool(spec.get("text_only", False)), spec.get("caption_first_prob", None)
    if text_only or caption_first is not None:
      ds = ds.map(_SourceView(text_only, None if caption_first is None else float(caption_first)))
    check_source(name, ds, split, d.layout.image_shape, d.warn_skip_rate)
    if by_tokens:
      mean = mean_document_tokens(ds, tokenizer, d.layout)
      weight /= mean
      logging.info("Source %s: %.1f tokens per document; token weight %s → document weight %.4g.", name, mean,
                   spec.get("weight", 1.0), weight)
    if seed is not None:
      ds = ds.shuffle(seed=seed + 7919 * i)
    ds = ds[shard::shards]
    if num_epochs != 1:
      ds = ds.repeat(num_epochs)
    datasets.append(ds)
    weights.append(weight)
  if not datasets:
    raise ValueError(f"every source in config.data.sources ({names}) has weight 0.")
  return datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)


def build_dataset(config, split: str, process_index: int = 0, process_count: int = 1, *,
                  num_epochs: int | None = None, shuffle: bool = True,
                  batch_size: int | None = None, shards: int | None = None) -> grain.IterDataset:
  """This host's dataset of packed batches (numpy dicts, see `unimm.data.packed`).

  `num_epochs=None` repeats forever (training); evaluation passes 1 and
  `shuffle=False`. `batch_size` is per host; it defaults to the global
  `config.data.batch_size` divided by `process_count`.

  The documents are split into `shards` disjoint shards (default `config.data.shards`; 0: one per
  process), each packed on its own into an equal part of the global batch; a process packs its consecutive shards
  and stacks their rows. The global batch so depends on the shard count only, not on how many
  processes share the shards: 1 process × 2 shards reads what 2 processes × 1 shard read.
  """
  d = DataSettings.from_config(config.data)
  shards = int(d.shards if shards is None else shards) or process_count
  if shards % process_count:
    raise ValueError(f"config.data.shards={shards} does not split over {process_count} processes; "
                     "use a multiple of the process count (or 0: one shard per process).")
  per_process = shards // process_count
  if batch_size is None:
    if d.batch_size % shards:
      raise ValueError(f"config.data.batch_size={d.batch_size} does not split into {shards} data shards "
                       f"({process_count} processes).")
    batch_size = d.batch_size // process_count
  if batch_size % per_process:
    raise ValueError(f"per-process batch {batch_size} does not split over this process's {per_process} shards.")
  seed = int(config.seed)
  parts = [_shard_batches(d, seed, split, process_index * per_process + j, shards, num_epochs=num_epochs,
                          shuffle=shuffle, batch_size=batch_size // per_process) for j in range(per_process)]
  batches = parts[0] if per_process == 1 else _Shards(parts)
  if d.worker_count > 0:
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count))
  return batches


def _shard_batches(d: DataSettings, seed: int, split: str, shard: int, shards: int, *, num_epochs: int | None,
                   shuffle: bool, batch_size: int) -> grain.IterDataset:
  """One data shard's packed batches (`seed`: the run's)."""
  tokenizer = load_tokenizer(d)
  docs = mixture(d, split, shard=shard, shards=shards, seed=seed if shuffle else None, num_epochs=num_epochs,
                 tokenizer=tokenizer)
  fragments = docs.random_map(_Layout(tokenizer, d.layout), seed=seed + 7907 * shard)
  it = fragments.to_iter_dataset(grain.ReadOptions(num_threads=d.read_threads, prefetch_buffer_size=d.read_prefetch))
  rows = packing.PackIterDataset(
      it, seq_len=d.seq_len, max_images=d.max_images_per_row, image_shape=d.layout.image_shape,
      pad_id=tokenizer.specials.pad, num_bins=d.packing_bins, split_long_documents=d.split_long_documents)
  return rows.batch(batch_size, drop_remainder=num_epochs is None)


def build_pipeline(config, split: str, process_index: int = 0, process_count: int = 1,
                   **kwargs) -> grain.DatasetIterator:
  """An iterator over this host's packed batches; its state saves with orbax (grain's args)."""
  return iter(build_dataset(config, split, process_index, process_count, **kwargs))
