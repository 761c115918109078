"""Which checkpoint is known good, and when a run has diverged.

A checkpoint at step s becomes *last known good* once the `good_after` steps after it all ran with a
finite loss and gradient and no loss spike (a loss above `spike_factor` × the median of the last
`window` finite losses, judged once `min_history` losses are in). Only the newest good step is kept as
such (`Checkpointer.mark_good`); the keep-last-K rotation spares it. The step metrics are the same
replicated values on every process, so every process decides the same without a collective.

Non-finite steps: with `skip_nonfinite` the update is skipped (the step function leaves the state alone)
and counted; `max_consecutive_skips` skips in a row end the run as a divergence. Without it the first one
does. A divergence leaves `WORKDIR/diverged.json` naming the step and the last good checkpoint, which
`--config.train.rewind_to_last_good=True` resumes from.
"""

from __future__ import annotations

import collections
import json
import os
import time

import numpy as np

DIVERGED_FILE = "diverged.json"


class Health:

  def __init__(self, *, good_after: int, spike_factor: float, max_consecutive_skips: int, window: int = 100,
               min_history: int = 20):
    self.good_after, self.spike_factor = int(good_after), float(spike_factor)
    self.max_consecutive_skips = int(max_consecutive_skips)
    self.min_history = int(min_history)
    self._losses = collections.deque(maxlen=int(window))
    self._candidates: list[int] = []  # checkpoints saved, waiting for `good_after` healthy steps
    self.consecutive_skips = 0
    self.total_skips = 0
    self._last_healthy = True

  def is_spike(self, loss: float) -> bool:
    return len(self._losses) >= self.min_history and loss > self.spike_factor * float(np.median(self._losses))

  def observe(self, step: int, loss: float, finite: bool) -> tuple[bool, int | None]:
    """Takes step `step`'s outcome. Returns (healthy, a checkpoint step that just became good or None)."""
    finite = bool(finite) and bool(np.isfinite(loss))
    if finite:
      self.consecutive_skips = 0
    else:
      self.consecutive_skips += 1
      self.total_skips += 1
    healthy = finite and not self.is_spike(loss)
    if finite:
      self._losses.append(float(loss))
    self._last_healthy = healthy
    if not healthy:
      self._candidates = [s for s in self._candidates if s >= step]  # the ones before it saw a bad step
      return False, None
    ready = [s for s in self._candidates if step - s >= self.good_after]
    if not ready:
      return True, None
    self._candidates = [s for s in self._candidates if s > max(ready)]
    return True, max(ready)

  @property
  def candidates(self) -> list[int]:
    return list(self._candidates)

  def saved(self, step: int) -> None:
    """A checkpoint of `step` was saved: a candidate, unless that step itself was unhealthy."""
    if self._last_healthy:
      self._candidates.append(int(step))

  @property
  def too_many_skips(self) -> bool:
    return self.consecutive_skips > self.max_consecutive_skips


def record_divergence(workdir: str, step: int, last_good: int | None, detail: str) -> None:
  with open(os.path.join(workdir, DIVERGED_FILE), "w") as f:
    json.dump({"step": int(step), "last_good": last_good, "detail": detail,
               "time": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=1)


def read_divergence(workdir: str) -> dict | None:
  try:
    with open(os.path.join(workdir, DIVERGED_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def archive_divergence(workdir: str) -> None:
  """Keeps the record of a divergence one has rewound from under a dated name (nothing is deleted)."""
  path = os.path.join(workdir, DIVERGED_FILE)
  if os.path.exists(path):
    os.replace(path, os.path.join(workdir, f"diverged-{time.strftime('%Y%m%d-%H%M%S')}.json"))
