"""Orbax checkpoints of the train state together with the data iterator's state.

Completeness follows orbax's own finalisation: a step is complete once orbax has finalised it (on a
local or POSIX filesystem the atomic rename of `N.orbax-checkpoint-tmp-*` to `N`; on GCS the
`commit_success.txt` it writes last). A save the job died in the middle of is never restored from; a
training run moves it aside to `incomplete/` (process 0, before anyone saves).

A complete checkpoint can still be damaged (a truncated array file, a bit flip on a disk, a lost
`_METADATA`, a torn data-iterator state). Each save stores a checksum of every array (wrapping sums and
XORs of the raw bits: exact and independent of the sharding, so a resume on another mesh checks too);
`restore_newest` verifies them, sets a damaged step aside to `damaged/` with what was wrong, and falls
back to the next newest step that restores cleanly. Nothing is deleted but by the keep-last-K rotation,
which spares the last-known-good step (`last_good.json`, see `unimm.train.health`).

Restoring takes an abstract state whose leaves carry the target shardings, so a run can resume on a
different mesh.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from typing import Callable, Sequence

from absl import logging
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from unimm.parallel import distributed

LAST_GOOD_FILE = "last_good.json"


class CheckpointSaveError(RuntimeError):
  """A save failed (disk full, permissions, killed writer): the run stops instead of training on unsaved."""


class NoUsableCheckpointError(RuntimeError):
  """Every checkpoint in a directory that holds some is damaged: a restart from scratch is not silent."""


def is_finalized(step_dir: str) -> bool:
  """Whether orbax finalised this step directory (its own test: atomic rename or commit file, by filesystem)."""
  return ocp.path.step.is_path_finalized(step_dir)


def has_step_dirs(directory: str) -> bool:
  """Whether a checkpoints directory holds any step (complete or not): a run there is a resume."""
  return os.path.isdir(directory) and any(re.fullmatch(r"\d+", n) for n in os.listdir(directory))


def incomplete_step_dirs(directory: str) -> list[str]:
  """Step directories a save never finished: orbax's temporaries and any step orbax does not call final."""
  if not os.path.isdir(directory):
    return []
  names = [n for n in sorted(os.listdir(directory)) if re.fullmatch(r"\d+(\.orbax-checkpoint-tmp.*)?", n)]
  return [n for n in names if not n.isdigit() or not is_finalized(os.path.join(directory, n))]


def set_aside(directory: str, name: str, kind: str) -> str:
  """Moves `directory/name` to `directory/kind/name-<time>` (never deletes); returns the new path."""
  target = os.path.join(directory, kind, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
  os.makedirs(os.path.dirname(target), exist_ok=True)
  shutil.move(os.path.join(directory, name), target)
  return target


# -- checksums -------------------------------------------------------------------------------------------
def _words(x: jax.Array) -> jax.Array:
  """The raw bits of `x` as unsigned words (uint32; 1- and 2-byte types widened, 8-byte types split)."""
  itemsize = np.dtype(x.dtype).itemsize
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if itemsize == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[itemsize])
  return bits.astype(jnp.uint32).reshape(-1)


@jax.jit
def _checksums(leaves):
  def one(x):
    w = _words(jnp.asarray(x))
    return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * w, dtype=jnp.uint32)])  # both wrap mod 2³²
  return [one(x) for x in leaves]


def checksums(state) -> dict[str, list[int]]:
  """{path: [Σw, Σw²] mod 2³²} over each array leaf's raw bits w (integer sums: the same on any mesh)."""
  paths, leaves = zip(*[(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
                        if isinstance(x, (jax.Array, np.ndarray))])
  sums = jax.device_get(_checksums(list(leaves)))
  return {p: [int(v[0]), int(v[1])] for p, v in zip(paths, sums)}


def _without_ema(state) -> dict:
  """The state's fields but the EMA, as the "state" item (saved apart, so a checkpoint with or without one
  restores either way)."""
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "ema"}


# -- the rotation that spares the last-known-good step ---------------------------------------------------
@dataclasses.dataclass
class KeepLatestAndProtected:
  """Orbax preservation policy: the newest `n` steps and the steps `protected()` names (the last known
  good one, and the candidates still waiting to become it)."""

  n: int
  protected: Callable[[], set[int]]

  def should_preserve(self, checkpoints: Sequence, *, context) -> Sequence[bool]:
    del context
    keep = self.protected() | {c.step for c in sorted(checkpoints, key=lambda c: c.step)[-self.n:]}
    return [c.step in keep for c in checkpoints]


PARAMS_FILES = "unimm_params.json"  # marks a directory of params as safetensors (unimm.convert's converted weights)


def mark_params_files(directory: str) -> None:
  """Marks `directory`'s safetensors (names: '/'-joined param paths) as a params tree `restore_params` reads."""
  with open(os.path.join(directory, PARAMS_FILES), "w") as f:
    json.dump({"format": "unimm-params", "names": "'/'-joined param paths", "version": 1}, f)


def read_params_files(directory: str) -> dict:
  """The params tree of a `mark_params_files` directory, each tensor placed on the default device as it is
  read (one copy of the params held)."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from unimm.convert import safetensors_io  # pylint: disable=g-import-not-at-top
  reader = safetensors_io.CheckpointReader(directory)
  # Blocking on each placement lets its NumPy buffer go before the next is read.
  return traverse_util.unflatten_dict({k: jax.device_put(reader.get(k)).block_until_ready() for k in reader.keys()},
                                      sep="/")


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
               set_aside_incomplete: bool = False):
    self.directory = os.path.abspath(directory)
    if set_aside_incomplete:
      if jax.process_index() == 0:
        self._set_aside_incomplete()
      distributed.barrier("checkpoints_set_aside")
    self._async = async_save
    self._pending: int | None = None  # the step of an async save not yet known to have finished
    self.candidates: set[int] = set()  # steps that may become last known good: spared by the rotation
    self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save, create=True,
        preservation_policy=KeepLatestAndProtected(keep, lambda: {self.last_good(), *self.candidates})))

  def _set_aside_incomplete(self) -> None:
    for name in incomplete_step_dirs(self.directory):
      target = set_aside(self.directory, name, "incomplete")
      logging.warning("Checkpoint %s/%s was never finalised (the job died while writing it): moved to %s; "
                      "resuming from the previous complete step.", self.directory, name, target)

  def all_steps(self) -> list[int]:
    """Finalised steps, oldest first (a directory of converted params files is step 0)."""
    if self._params_files():
      return [0]
    return sorted(s for s in self._manager.all_steps() if is_finalized(os.path.join(self.directory, str(s))))

  def _params_files(self) -> bool:
    return os.path.exists(os.path.join(self.directory, PARAMS_FILES))

  def latest_step(self) -> int | None:
    """The newest finalised step (None if there is none)."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  # -- last known good ------------------------------------------------------------------------------------
  def last_good(self) -> int | None:
    """The last-known-good step (`unimm.train.health`), if one is recorded and still on disk."""
    path = os.path.join(self.directory, LAST_GOOD_FILE)
    try:
      with open(path) as f:
        step = int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
      return None
    return step if os.path.isdir(os.path.join(self.directory, str(step))) else None

  def mark_good(self, step: int, why: str) -> None:
    """Records `step` as last known good (process 0 writes; every process decides the same from the same
    replicated metrics, so they agree without a collective)."""
    if jax.process_index() != 0:
      return
    tmp = os.path.join(self.directory, LAST_GOOD_FILE + ".tmp")
    with open(tmp, "w") as f:
      json.dump({"step": int(step), "why": why, "time": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
    os.replace(tmp, os.path.join(self.directory, LAST_GOOD_FILE))

  # -- save -----------------------------------------------------------------------------------------------
  def save(self, step: int, state, data_iterator) -> None:
    """Starts saving `step` (async unless configured otherwise). A failure of this save or of the previous
    async one raises `CheckpointSaveError` naming the newest step that is safe to resume from."""
    self._raise_if_failed()
    items = {"state": ocp.args.StandardSave(_without_ema(state)),
             "data": grain.checkpoint.CheckpointSave(data_iterator), "checksums": ocp.args.JsonSave(checksums(state))}
    if getattr(state, "ema", None) is not None:
      items["ema"] = ocp.args.StandardSave(state.ema)
    try:
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # orbax raises what the filesystem raised
      raise self._save_error(step, e) from e
    self._pending = step
    if not self._async:
      self._raise_if_failed()

  def _raise_if_failed(self) -> None:
    if self._pending is None:
      return
    try:
      self._manager.check_for_errors()
      if not self._async:
        self._manager.wait_until_finished()
    except Exception as e:
      raise self._save_error(self._pending, e) from e

  def _save_error(self, step: int, error: Exception) -> CheckpointSaveError:
    good = [s for s in self.all_steps() if s != step]
    resume = f"step {good[-1]}" if good else "none: a restart begins at step 0"
    return CheckpointSaveError(
        f"saving the checkpoint of step {step} in {self.directory} failed ({type(error).__name__}: {error}). "
        f"The newest complete checkpoint, where a restart resumes: {resume}. Fix the cause (disk space, "
        "permissions) and rerun the same command; the run stopped rather than train on without checkpoints.")

  # -- restore --------------------------------------------------------------------------------------------
  def restore(self, step: int, abstract_state, data_iterator):
    """The state at `step` (placed as `abstract_state`'s shardings say), its checksums verified; rewinds
    `data_iterator`. Raises on any damage (see `restore_newest`). The EMA is restored when
    `abstract_state` has one and the step holds one; otherwise the state's `ema` is None (the caller
    starts one from the weights, see `loop.restore_or_start`)."""
    step_dir = os.path.join(self.directory, str(step))
    with_ema = getattr(abstract_state, "ema", None) is not None and os.path.isdir(os.path.join(step_dir, "ema"))
    args = {"state": ocp.args.StandardRestore(_without_ema(abstract_state))}
    if with_ema:
      args["ema"] = ocp.args.StandardRestore(abstract_state.ema)
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    if os.path.isdir(os.path.join(step_dir, "checksums")):
      args["checksums"] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    state = abstract_state.replace(**restored.state, ema=restored.ema if with_ema else None)
    if "checksums" in args:
      # A saved EMA that is not restored (EMA off now) is not checked.
      stored = {k: v for k, v in restored.checksums.items() if with_ema or not k.startswith(".ema")}
      got = checksums(state)
      bad = sorted(k for k in set(stored) | set(got) if stored.get(k) != got.get(k))
      if bad:
        raise ValueError(f"checksum mismatch in {len(bad)} arrays (the data on disk changed after the save): "
                         f"{bad[:5]}")
    return state

  def restore_newest(self, abstract_state, data_iterator):
    """(state, step) from the newest step that restores cleanly, or (None, None) when the directory holds
    none. A damaged step is logged with what failed and moved to `damaged/` (every process must have
    restored it; process 0 moves it). Raises `NoUsableCheckpointError` when steps exist but none restores:
    starting over is then the user's explicit choice, never a silent restart from step 0."""
    failed = []
    for step in reversed(self.all_steps()):
      try:
        state, error = self.restore(step, abstract_state, data_iterator), ""
      except Exception as e:  # whatever the damage, orbax, tensorstore and grain raise their own kinds
        state, error = None, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:500]}"
      if distributed.all_agree(not error):
        return state, step
      diagnosis = diagnose(os.path.join(self.directory, str(step)))
      logging.error("Checkpoint step %d in %s does not restore (%s%s); setting it aside in damaged/ and trying "
                    "the previous one.", step, self.directory, error or "it failed on another process",
                    f"; {diagnosis}" if diagnosis else "")
      if jax.process_index() == 0:
        set_aside(self.directory, str(step), "damaged")
      distributed.barrier(f"checkpoint_{step}_set_aside")
      self._manager.reload()
      failed.append(step)
    if failed:
      raise NoUsableCheckpointError(
          f"no checkpoint in {self.directory} restores: steps {failed} are damaged (moved to "
          f"{self.directory}/damaged/, see the errors above). To start over from step 0 anyway, set "
          "--config.train.restart_from_scratch=True (the damaged steps stay where they are).")
    return None, None

  def _on_this_device(self, step: int, item: str):
    """A restore target for `item` of `step`: its saved shapes and dtypes on the default device, whatever
    devices saved it (orbax restores a target-less item onto the saving topology, which may not be here:
    a run on 8 devices read by a 1-device eval, a checkpoint written sharded by unimm.convert)."""
    with ocp.StandardCheckpointer() as reader:
      metadata = reader.metadata(os.path.join(self.directory, str(step), item)).item_metadata
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
                        if hasattr(m, "shape") and hasattr(m, "dtype") else m, metadata)

  def restore_params(self, step: int | None = None):
    """Only the parameters (e.g. a frozen autoencoder or a previous stage), on the default device. A
    directory of converted weights (`PARAMS_FILES`, written by `unimm.convert`) is read tensor by tensor."""
    if self._params_files() and step in (None, 0):
      return read_params_files(self.directory)
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    return self._restore_item(step, "state")["params"]

  def _restore_item(self, step: int, item: str):
    """`item` of `step` placed as it was saved; on this device when the saving topology is not here."""
    try:
      return getattr(self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore()})), item)
    except ValueError as e:  # orbax: "devices are different" / "topology mismatch"
      logging.info("Checkpoint %s/%d was saved on other devices (%s); restoring %s onto %s.", self.directory, step,
                   str(e).splitlines()[0][:200], item, jax.local_devices()[0])
      target = self._on_this_device(step, item)
      return getattr(self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)})),
                     item)

  def restore_ema(self, step: int):
    """The EMA of the trainable params saved at `step` (on the default device), or None if it has none."""
    if not os.path.isdir(os.path.join(self.directory, str(step), "ema")):
      return None
    return self._restore_item(step, "ema")

  def move_newer_aside(self, step: int, kind: str) -> list[str]:
    """Moves every finalised step newer than `step` to `kind/` (process 0); returns the moved names."""
    newer = [s for s in self.all_steps() if s > step]
    if jax.process_index() == 0:
      for s in newer:
        set_aside(self.directory, str(s), kind)
    distributed.barrier(f"newer_than_{step}_set_aside")
    self._manager.reload()
    return [str(s) for s in newer]

  def wait(self) -> None:
    self._manager.wait_until_finished()
    self._raise_if_failed()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()


def diagnose(step_dir: str) -> str:
  """What is visibly wrong with a step directory (missing metadata, empty or missing items), or ''."""
  problems = []
  for item in ("_CHECKPOINT_METADATA", "state/_METADATA", "state", "data"):
    if not os.path.exists(os.path.join(step_dir, item)):
      problems.append(f"{item} is missing")
  for root, _, files in os.walk(step_dir):
    for name in files:
      if os.path.getsize(os.path.join(root, name)) == 0:
        problems.append(f"{os.path.relpath(os.path.join(root, name), step_dir)} is empty")
  return ", ".join(problems[:8])
