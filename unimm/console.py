"""What the console shows: unimm's own progress and every library's warnings; library INFO goes to a file.

    console.setup(workdir, process_index)  # once, at CLI start-up, after absl parsed the flags

orbax, TFDS, grain and JAX log through Python logging (orbax and TFDS through absl.logging, like unimm,
so they all reach the root logger's absl handler); at INFO a short run prints dozens of lines of
checkpoint internals. After `setup`:
  - stderr (absl's handler) shows records at WARNING and above from anything, and INFO from unimm's own
    code (the `unimm` package and `launch/`), in a compact format (level, time, file:line);
  - WORKDIR/logs/unimm.log (unimm.I.log for process I > 0) gets every record at the absl verbosity
    (INFO unless --verbosity says otherwise), from every library, in absl's full format, appended
    across resumes. launch/local.py's own per-process capture is WORKDIR/logs/process_I.log.
absl's flags keep their meaning where they have one: --verbosity and --logger_levels decide which
records exist at all (both outputs); --alsologtostderr or --logtostderr show every record on stderr
(no filter); --stderrthreshold=LEVEL, when given, is the level from which library records reach stderr.
What is not logging stays as it was: tqdm bars (training, TFDS's dataset preparation), TFDS's prints,
Python warnings, and C++ logs (XLA, libtpu).
"""

from __future__ import annotations

import logging
import os
import socket

from absl import flags
from absl import logging as absl_logging
from absl.logging import converter

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Directories whose records count as unimm's own: the package, and the launchers next to it in a checkout.
OWN_CODE_DIRS = (_PACKAGE_DIR, os.path.join(os.path.dirname(_PACKAGE_DIR), "launch"))
LOG_DIR = "logs"
# Scheduler variables that name this process's rank before `jax.distributed` starts.
_RANK_VARIABLES = ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK")


def is_own_code(pathname: str, own_dirs=OWN_CODE_DIRS) -> bool:
  """Whether a record's source file lies inside unimm's own code."""
  path = os.path.abspath(pathname)
  return any(path.startswith(d + os.sep) for d in own_dirs)


class ConsoleFilter(logging.Filter):
  """Passes unimm's own records at any level, and other code's at `library_level` and above."""

  def __init__(self, library_level: int = logging.WARNING, own_dirs=OWN_CODE_DIRS):
    super().__init__()
    self.library_level = library_level
    self.own_dirs = own_dirs

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= self.library_level or is_own_code(record.pathname, self.own_dirs)


class ConsoleFormatter(logging.Formatter):
  """`I0102 03:04:05 loop.py:145] message`: absl's prefix without microseconds and thread id."""

  def __init__(self):
    super().__init__("%(asctime)s %(filename)s:%(lineno)d] %(message)s", datefmt="%m%d %H:%M:%S")

  def format(self, record: logging.LogRecord) -> str:
    return converter.get_initial_for_level(record.levelno) + super().format(record)


class FileFormatter(logging.Formatter):
  """absl's full prefix (microseconds, thread id: orbax logs from several threads), whatever
  --showprefixforinfo says about the console."""

  def format(self, record: logging.LogRecord) -> str:
    return absl_logging.get_absl_log_prefix(record) + super().format(record)


def process_index(explicit: int | None, distributed_mode: str = "auto", env=None) -> int | None:
  """This process's index as far as it is known before `jax.distributed` starts: --process_id, else the
  scheduler's rank variable; None where JAX will find it out itself (TPU pods, XPK); else 0."""
  env = os.environ if env is None else env
  if explicit is not None:
    return explicit
  if distributed_mode == "off":
    return 0
  rank = next((env[v] for v in _RANK_VARIABLES if env.get(v, "").isdigit()), None)
  if rank is not None:
    return int(rank)
  if distributed_mode == "on" or "JAX_COORDINATOR_ADDRESS" in env:
    return None
  return 0


def log_file_path(workdir: str, index: int | None) -> str:
  """WORKDIR/logs/unimm.log for process 0; unimm.I.log for others; unimm.HOST.log when I is unknown."""
  if index == 0:
    name = "unimm.log"
  else:
    name = f"unimm.{socket.gethostname() if index is None else index}.log"
  return os.path.join(workdir, LOG_DIR, name)


def stderr_library_level() -> int | None:
  """The level from which library records reach stderr, from absl's flags; None: no filter at all."""
  if flags.FLAGS["logtostderr"].value or flags.FLAGS["alsologtostderr"].value:
    return None
  if flags.FLAGS["stderrthreshold"].present:
    return converter.string_to_standard(flags.FLAGS["stderrthreshold"].value)
  return logging.WARNING


def filter_console(handler: logging.Handler, library_level: int | None) -> None:
  """Installs the console filter and format on `handler` (once: a second call replaces the first)."""
  for old in [f for f in handler.filters if isinstance(f, ConsoleFilter)]:
    handler.removeFilter(old)
  if library_level is not None:
    handler.addFilter(ConsoleFilter(library_level))
  handler.setFormatter(ConsoleFormatter())


def add_log_file(path: str, logger: logging.Logger | None = None) -> logging.Handler:
  """Appends every record that `logger` (default: the root) passes to `path`; returns the handler."""
  logger = logging.getLogger() if logger is None else logger
  path = os.path.abspath(path)
  for old in logger.handlers:
    if isinstance(old, logging.FileHandler) and old.baseFilename == path:
      return old
  os.makedirs(os.path.dirname(path), exist_ok=True)
  handler = logging.FileHandler(path, mode="a", encoding="utf-8")
  handler.setFormatter(FileFormatter())
  # First in line, ahead of absl's handler, which aborts the process on an absl FATAL record: the file
  # gets that record too.
  others = list(logger.handlers)
  for other in others:
    logger.removeHandler(other)
  for h in [handler, *others]:
    logger.addHandler(h)
  return handler


def setup(workdir: str | None, index: int | None = 0) -> str | None:
  """The console filter on absl's stderr handler; with a workdir, the log file too. Returns its path."""
  filter_console(absl_logging.get_absl_handler(), stderr_library_level())
  if not workdir:
    return None
  path = log_file_path(workdir, index)
  add_log_file(path)
  absl_logging.info("Full log, library INFO included: %s", path)
  return path
