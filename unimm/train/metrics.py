"""Training metrics: clu averages per logging window, written as JSON lines and TensorBoard events.

Only process 0 writes. The JSON-lines log is rewound on resume so it never
holds steps from beyond the restored checkpoint (a killed run's tail).
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


class MetricWriter:

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(self.path):  # drop what a killed run logged past its last checkpoint
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(kept)
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
