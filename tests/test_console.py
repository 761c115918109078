"""The console shows unimm's progress and every warning; library INFO goes to WORKDIR/logs/unimm.log.
(A real training run's console is checked on test_train_loop's run.)"""

import io
import logging
import os
import re

from absl.testing import flagsaver

from conftest import REPO
from unimm import console

ORBAX_FILE = "/venv/lib/python3.11/site-packages/orbax/checkpoint/checkpoint_manager.py"
UNIMM_FILE = os.path.join(REPO, "unimm", "train", "loop.py")
# An absl-style line's level and file, in absl's full format or the console's shorter one. Not anchored
# to a line start: a log line can follow a tqdm bar on the same line.
LOG_LINE = re.compile(r"([IWEF])\d{4} \d\d:\d\d:\d\d(?:\.\d+)?(?: \d+)? ([\w.-]+):\d+\] ")


def record(level, pathname, message="hello"):
  return logging.LogRecord("absl", level, pathname, 1, message, None, None)


def console_stream(library_level=logging.WARNING):
  """A logger whose one handler writes to a string, through the console filter."""
  stream = io.StringIO()
  handler = logging.StreamHandler(stream)
  console.filter_console(handler, library_level)
  logger = logging.Logger("console-test", logging.DEBUG)
  logger.addHandler(handler)
  return logger, stream


def test_console_shows_library_warnings_and_own_info_but_not_library_info():
  logger, stream = console_stream()
  logger.handle(record(logging.INFO, ORBAX_FILE, "orbax internals"))
  logger.handle(record(logging.WARNING, ORBAX_FILE, "orbax warns"))
  logger.handle(record(logging.ERROR, ORBAX_FILE, "orbax fails"))
  logger.handle(record(logging.INFO, UNIMM_FILE, "unimm progress"))
  logger.handle(record(logging.INFO, os.path.join(REPO, "launch", "local.py"), "launcher progress"))
  shown = stream.getvalue()
  assert "orbax internals" not in shown
  assert "orbax warns" in shown and "orbax fails" in shown
  assert "unimm progress" in shown and "launcher progress" in shown
  assert re.search(r"^W\d{4} \d\d:\d\d:\d\d checkpoint_manager.py:1\] orbax warns$", shown, re.M), shown


def test_stderrthreshold_sets_the_library_level_and_alsologtostderr_shows_everything():
  logger, stream = console_stream(library_level=logging.ERROR)
  logger.handle(record(logging.WARNING, ORBAX_FILE, "orbax warns"))
  logger.handle(record(logging.ERROR, ORBAX_FILE, "orbax fails"))
  assert "orbax warns" not in stream.getvalue() and "orbax fails" in stream.getvalue()
  assert console.stderr_library_level() == logging.WARNING
  with flagsaver.flagsaver(alsologtostderr=True):
    assert console.stderr_library_level() is None
  logger, stream = console_stream(library_level=None)
  logger.handle(record(logging.INFO, ORBAX_FILE, "orbax internals"))
  assert "orbax internals" in stream.getvalue()


def test_log_file_gets_every_library_record_appended_across_runs(tmp_path):
  path = console.log_file_path(str(tmp_path), 0)
  assert path == os.path.join(str(tmp_path), "logs", "unimm.log")
  for run in range(2):
    logger = logging.Logger(f"run-{run}", logging.INFO)
    handler = console.add_log_file(path, logger)
    assert console.add_log_file(path, logger) is handler  # a second call adds no second copy
    logger.handle(record(logging.INFO, ORBAX_FILE, f"orbax internals {run}"))
    logger.handle(record(logging.INFO, UNIMM_FILE, f"unimm progress {run}"))
    handler.close()
  lines = open(path).read().splitlines()
  assert [l.split("] ", 1)[1] for l in lines] == [
      "orbax internals 0", "unimm progress 0", "orbax internals 1", "unimm progress 1"]
  assert LOG_LINE.match(lines[0]).groups() == ("I", "checkpoint_manager.py")


def test_each_process_has_its_own_log_file():
  assert console.process_index(None, "auto", env={}) == 0
  assert console.process_index(3, "auto", env={}) == 3
  assert console.process_index(None, "auto", env={"SLURM_PROCID": "2"}) == 2
  assert console.process_index(None, "on", env={}) is None  # JAX finds it out later (TPU pods)
  assert console.process_index(None, "off", env={"SLURM_PROCID": "2"}) == 0
  assert console.log_file_path("/w", 2) == "/w/logs/unimm.2.log"
  assert console.log_file_path("/w", None).startswith("/w/logs/unimm.") and console.log_file_path("/w", None) != \
      console.log_file_path("/w", 0)
