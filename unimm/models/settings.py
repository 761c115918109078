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


_CASTS = {"int": int, "float": float, "bool": bool, "str": str}


def typed_values(cls, cfg, where: str, *, also_known=(), skip=()) -> dict:
  """The values of `cls`'s fields (but `skip`) in `cfg`, each scalar cast to its declared type (int, float,
  bool, str; lists become tuples). Every field must be there, and `cfg` may hold no other key than
  `also_known` ones (read by others); `where` names the node in the errors."""
  names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
  keys = set(cfg.keys())
  unknown = keys - set(names) - set(also_known)
  if unknown:
    raise ValueError(f"unknown {where} keys {sorted(unknown)}; known: {sorted([*names, *also_known])}")
  missing = set(names) - keys
  if missing:
    raise ValueError(f"{where} lacks {sorted(missing)}: start from configs/common.py's base_config()")
  types = {f.name: f.type for f in dataclasses.fields(cls)}
  as_is = lambda v: tuple(v) if isinstance(v, list) else v  # pylint: disable=unnecessary-lambda-assignment
  return {name: _CASTS.get(types[name], as_is)(cfg[name]) for name in names}
