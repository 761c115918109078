"""Orbax checkpoints of the train state together with the data iterator's state.

A step directory is complete only once orbax commits it (it writes `commit_success.txt` last); a
save the job died in the middle of is never restored from: `latest_step` skips it, and a training
run moves it aside to `incomplete/` (process 0, before anyone saves) and resumes from the previous
complete step. Restoring takes an abstract state whose leaves carry the target shardings, so a run
can resume on a different mesh.
"""

from __future__ import annotations

import os
import re
import shutil
import time

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp

from unimm.parallel import distributed

COMMIT_MARKER = "commit_success.txt"


def is_committed(step_dir: str) -> bool:
  return os.path.exists(os.path.join(step_dir, COMMIT_MARKER))


def incomplete_step_dirs(directory: str) -> list[str]:
  """Step directories a save never finished: orbax's temporaries and steps without the commit marker."""
  if not os.path.isdir(directory):
    return []
  names = [n for n in sorted(os.listdir(directory)) if re.fullmatch(r"\d+(\.orbax-checkpoint-tmp.*)?", n)]
  return [n for n in names if not n.isdigit() or not is_committed(os.path.join(directory, n))]


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
               set_aside_incomplete: bool = False):
    self.directory = os.path.abspath(directory)
    if set_aside_incomplete:
      if jax.process_index() == 0:
        self._set_aside_incomplete()
      distributed.barrier("checkpoints_set_aside")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                             create=True))

  def _set_aside_incomplete(self) -> None:
    for name in incomplete_step_dirs(self.directory):
      target = os.path.join(self.directory, "incomplete", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.directory, name), target)
      logging.warning("Checkpoint %s/%s was never committed (the job died while writing it): moved to %s; "
                      "resuming from the previous complete step.", self.directory, name, target)

  def latest_step(self) -> int | None:
    """The newest committed step (None if there is none)."""
    steps = [s for s in self._manager.all_steps() if is_committed(os.path.join(self.directory, str(s)))]
    return max(steps) if steps else None

  def save(self, step: int, state, data_iterator) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)

  def restore(self, step: int, abstract_state, data_iterator):
    """The state at `step` (placed as `abstract_state`'s shardings say); rewinds `data_iterator`."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored.state

  def restore_params(self, step: int | None = None):
    """Only the parameters (e.g. a frozen autoencoder or a previous stage), on the default device."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return restored.state["params"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
