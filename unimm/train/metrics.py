"""Training metrics: clu averages per logging window, written as JSON lines and TensorBoard events.

Only process 0 writes. The JSON-lines log is rewound on resume so it never
holds steps from beyond the restored checkpoint (a killed run's tail); nothing
is destroyed: the lines cut (and a torn last line a kill during an append
leaves) move to `metrics.rewound.jsonl`, each with the step it was cut at.
"""

from __future__ import annotations

import functools
import json
import os

from clu import metrics as clu_metrics
import flax
import numpy as np


@functools.lru_cache(maxsize=None)
def averages(names: tuple[str, ...]) -> type:
  """A clu Collection averaging each named step output over a logging window (one class per name set)."""
  return flax.struct.dataclass(type("WindowAverages", (clu_metrics.Collection,), {
      "__annotations__": {n: clu_metrics.Average.from_output(n) for n in names}}))


def rewind_log(path: str, resume_step: int) -> int:
  """Keeps the lines of `path` up to `resume_step`; moves the rest (steps past it, torn or unreadable lines)
  to `<stem>.rewound.jsonl` with the step they were cut at; returns how many moved."""
  kept, cut = [], []
  with open(path, "rb") as f:
    for raw in f:
      line = raw.decode("utf-8", errors="replace").rstrip("\n")
      if not line.strip():
        continue
      try:
        step = json.loads(line)["step"]
        keep = int(step) <= resume_step
      except (ValueError, KeyError, TypeError):
        keep = False
      (kept if keep else cut).append(line)
  if not cut:
    return 0
  with open(path.replace(".jsonl", ".rewound.jsonl"), "a") as f:
    f.writelines(json.dumps({"cut_at_step": int(resume_step), "line": line}) + "\n" for line in cut)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(line + "\n" for line in kept)
  os.replace(tmp, path)
  return len(cut)


class MetricWriter:

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(self.path):
      rewind_log(self.path, resume_step)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

  def scalars(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in values.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **clean}) + "\n")
    for k, v in clean.items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    if self.enabled:
      self._tb.add_image(name, image, step, dataformats="HWC")
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
