"""The multi-controller runtime: one process per host (or per GPU), joined by `jax.distributed`.

    initialize(coordinator_address, num_processes, process_id)  # before any other JAX call

Explicit arguments win; otherwise a cluster JAX detects itself (SLURM with more than one task,
Open MPI, GKE/XPK through `JAX_COORDINATOR_ADDRESS`; TPU pods pass mode="on") starts it; otherwise
the run is one process.
Losing a process is fatal for all: the coordination service notices the missing heartbeats and every
survivor aborts with "the JAX distributed service detected fatal errors" after `heartbeat_timeout_s`,
instead of hanging in a collective. The launcher (or the scheduler) restarts all of them and the run
resumes from its last complete checkpoint.

SIGTERM (preemption) reaches one host first; `Preemption.reached(step)` turns it into one agreed step
on every host (the hosts gather their SIGTERM flags after each step), so all hosts save the same step
and exit together.
"""

from __future__ import annotations

import os
import signal
import threading

from absl import logging
import jax
import numpy as np

# Environment variables by which a scheduler says that this is one task of several.
_CLUSTER_SIGNS = {
    # Inside an srun step of several tasks (a batch script's own shell is not one of them).
    "SLURM": lambda env: int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in env,
    "Open MPI": lambda env: int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1,
    "JAX_COORDINATOR_ADDRESS": lambda env: "JAX_COORDINATOR_ADDRESS" in env,
}


def detected_cluster(env=None) -> str | None:
  """The scheduler whose multi-task environment this process runs in, or None (one process)."""
  env = os.environ if env is None else env
  return next((name for name, sign in _CLUSTER_SIGNS.items() if sign(env)), None)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_s: int = 100, mode: str = "auto") -> bool:
  """Joins the multi-process runtime when asked or detected; returns whether this run is multi-process.

  `mode`: auto (explicit arguments, else a detected cluster, else one process), on (JAX detects the
  cluster; what the TPU pod launcher passes, as TPU VMs say their topology through metadata), off.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"distributed mode {mode!r}: use auto, on or off")
  if mode == "off":
    return False
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError("multi-process flags go together: --coordinator_address=HOST:PORT --num_processes=N "
                       f"--process_id=I (got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    if num_processes == 1:
      return False
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)
  elif mode == "on" or (cluster := detected_cluster()) is not None:
    logging.info("Joining the JAX distributed runtime (%s).", "asked" if mode == "on" else f"{cluster} job")
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)
  else:
    return False
  catch_sigterm()
  logging.info("Process %d of %d; %d local of %d devices.", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def all_agree(ok: bool) -> bool:
  """Whether `ok` holds on every process (a small host collective when there are several)."""
  if jax.process_count() == 1:
    return bool(ok)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.min(multihost_utils.process_allgather(np.asarray(bool(ok), np.int32))))


_SIGTERM = threading.Event()


def catch_sigterm() -> None:
  """From now on SIGTERM sets a flag (`Preemption` reads it) instead of ending the process. Called right
  after `jax.distributed.initialize` (which installs a handler of its own for JAX's preemption sync
  points, whose sync step comes from call counters that a resumed run or orbax's own calls do not keep
  in step), so a SIGTERM during startup is not lost."""
  try:
    signal.signal(signal.SIGTERM, lambda signum, frame: _SIGTERM.set())
  except ValueError:  # not the main thread: leave signals alone
    pass


class Preemption:
  """Whether to save and stop after this step: a SIGTERM flag, agreed across processes. After every
  step all processes gather their flags (one small host collective), so each answers True at the same
  step once any of them got SIGTERM."""

  def __init__(self):
    self._previous = None
    self._multiprocess = jax.process_count() > 1

  @property
  def requested(self) -> bool:
    return _SIGTERM.is_set()

  def __enter__(self):
    self._previous = signal.getsignal(signal.SIGTERM)
    catch_sigterm()
    return self

  def reached(self, step: int) -> bool:
    del step  # every process calls this once per step, so the gathers line up
    if not self._multiprocess:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
    return bool(np.max(flags))

  def __exit__(self, *exc):
    try:
      signal.signal(signal.SIGTERM, self._previous)
    except (ValueError, TypeError):  # not the main thread, or a handler Python did not install
      pass
