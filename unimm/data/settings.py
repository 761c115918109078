"""`config.data` as typed settings (`DataSettings`), parsed once where a pipeline or a train step is built
and passed down. Kept free of the pipeline's imports (grain, TFDS): the step's setup reads it too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from unimm.data import layout
from unimm.models import settings


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """`config.data` as typed settings. Strict: a key neither this class nor `LayoutOptions` reads fails,
  naming the known ones (a typo in `--config.data.…` never passes silently)."""

  data_dir: str
  sources: Any  # name → source entry (`sources.open_source`); entries keep their own optional keys
  tokenizer: Any  # the tokenizer node (`load_tokenizer`, `prepare`)
  batch_size: int  # global: over every process
  seq_len: int
  max_images_per_row: int
  mix_by: str  # documents | tokens: what a source's weight is a share of
  shards: int  # data shards of the global batch; 0: one per process
  packing_bins: int  # rows packed at once (first fit)
  split_long_documents: bool
  read_threads: int
  read_prefetch: int
  worker_count: int  # grain worker processes; 0: in the training process
  warn_skip_rate: float  # a source's skipped share that warns
  layout: layout.LayoutOptions  # from `LayoutOptions.CONFIG_KEYS`

  @classmethod
  def from_config(cls, data_config) -> "DataSettings":
    # read_image_fit is the sample/score commands' (prompt images), not the pipeline's.
    values = settings.typed_values(cls, data_config, "config.data",
                                   also_known=(*layout.LayoutOptions.CONFIG_KEYS, "read_image_fit"), skip=("layout",))
    fit = data_config.get("read_image_fit", "resize")
    if fit not in ("resize", "crop", "pad"):
      raise ValueError(f"data.read_image_fit={fit!r}; expected resize, crop or pad")
    if values["mix_by"] not in ("documents", "tokens"):
      raise ValueError(f"data.mix_by={values['mix_by']!r}; expected 'documents' or 'tokens'")
    return cls(**values, layout=layout.LayoutOptions.from_config(data_config))
