"""Frozen dataclass settings from ml_collections config nodes, refusing keys the dataclass lacks.

A typo in `--config.model.vq.codebok_size=…` must fail loudly, naming the known keys, not be ignored.
"""

from __future__ import annotations

import dataclasses


def from_config(cls, cfg, where: str):
  """`cls(**cfg)` with lists turned to tuples; `where` names the config node in the error."""
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = set(cfg.keys()) - fields
  if unknown:
    raise ValueError(f"unknown {where} keys {sorted(unknown)}; known: {sorted(fields)}")
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in ((k, cfg[k]) for k in cfg.keys())})
