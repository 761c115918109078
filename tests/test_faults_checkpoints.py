"""Fault injection on training workdirs: damaged checkpoints, torn logs, config drift, divergence, failed
saves. Each case asserts that the run resumes from the last good state (or stops with the fix named) and
that nothing good is lost. In-process `loop.train` on a one-layer model (the CLI paths, SIGTERM among
them, are in test_train_loop.py)."""

import dataclasses
import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_config
from unimm.train import checkpoint, config_record, health, loop, metrics

pytestmark = pytest.mark.slow


def tiny(data_dir, **train):
  config = small_config(data_dir)
  b = config.model.backbone
  b.num_layers, b.dim, b.num_heads, b.mlp_hidden = 1, 32, 2, 64
  config.data.batch_size = 4
  t = config.train
  t.num_steps, t.checkpoint_every, t.log_every, t.warmup_steps = 8, 2, 1, 2
  t.sample_every = t.final_eval_examples = 0
  t.async_checkpoints = False
  t.good_after_steps = 2
  for k, v in train.items():
    t[k] = v
  return config


def logged(workdir):
  return {r["step"]: r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}


def steps_on_disk(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """An 8-step run (checkpoints 4, 6, 8 kept; 6 last known good) and its per-step metrics, copied by each
  test."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  loop.train(tiny(data_dir), workdir)
  return workdir, logged(workdir)


def copy(trained, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained[0], workdir)
  return workdir


def resume(data_dir, workdir, **train):
  return loop.train(tiny(data_dir, **train), workdir)


def test_a_step_without_the_commit_file_is_complete_by_orbax_rule(data_dir, trained, tmp_path):
  """A copy tool that drops commit_success.txt: on a local filesystem orbax finalises by rename, so the step
  is complete; the run resumes there, not from step 0, and keeps its metrics."""
  workdir = copy(trained, tmp_path)
  for marker in glob.glob(os.path.join(workdir, "checkpoints", "*", "**", "commit_success.txt"), recursive=True):
    os.remove(marker)
  os.makedirs(os.path.join(workdir, "checkpoints", "10.orbax-checkpoint-tmp-1700000000", "state"))
  result = resume(data_dir, workdir, num_steps=10)
  assert result["step"] == 10
  assert os.listdir(os.path.join(workdir, "checkpoints", "incomplete"))[0].startswith("10.orbax")
  got = logged(workdir)
  assert sorted(got) == list(range(1, 11)) and all(got[s] == trained[1][s] for s in range(1, 9))


@pytest.mark.parametrize("damage", ["truncated_array", "flipped_bytes", "torn_iterator_state", "no_metadata"])
def test_a_damaged_checkpoint_is_set_aside_and_the_previous_one_resumes(data_dir, trained, tmp_path, damage):
  workdir = copy(trained, tmp_path)
  step_dir = os.path.join(workdir, "checkpoints", "8")
  if damage == "no_metadata":
    os.remove(os.path.join(step_dir, "state", "_METADATA"))
  elif damage == "torn_iterator_state":
    (path,) = glob.glob(os.path.join(step_dir, "data", "process_*.json"))
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  else:
    path = max(glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True), key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    if damage == "truncated_array":
      data = data[:len(data) // 2]
    else:
      data[len(data) // 2:len(data) // 2 + 8] = bytes(8)
    open(path, "wb").write(bytes(data))
  result = resume(data_dir, workdir, num_steps=10)
  assert result["step"] == 10
  damaged = os.listdir(os.path.join(workdir, "checkpoints", "damaged"))
  got = logged(workdir)
  if damage == "no_metadata" and not damaged:
    return  # orbax restored it from the target's structure: nothing was lost
  assert [n.split("-")[0] for n in damaged] == ["8"]  # kept aside, not deleted
  assert all(got[s] == trained[1][s] for s in range(1, 7))  # resumed from 6: its steps agree
  assert json.loads(open(os.path.join(workdir, "metrics.rewound.jsonl")).readline())["cut_at_step"] == 6


def test_no_restorable_checkpoint_never_restarts_silently(data_dir, trained, tmp_path):
  workdir = copy(trained, tmp_path)
  for step in steps_on_disk(workdir):
    os.remove(os.path.join(workdir, "checkpoints", str(step), "state", "manifest.ocdbt"))
  with pytest.raises(checkpoint.NoUsableCheckpointError, match="restart_from_scratch=True"):
    resume(data_dir, workdir)
  assert sorted(n.split("-")[0] for n in os.listdir(os.path.join(workdir, "checkpoints", "damaged"))) == ["4", "6", "8"]
  assert logged(workdir) == trained[1]  # metrics untouched
  result = resume(data_dir, workdir, restart_from_scratch=True, num_steps=2)
  assert result["step"] == 2
  cut = [json.loads(line) for line in open(os.path.join(workdir, "metrics.rewound.jsonl"))]
  assert len(cut) == 8 and {c["cut_at_step"] for c in cut} == {0}  # the old history kept aside


def test_a_torn_metrics_line_is_repaired(data_dir, trained, tmp_path):
  workdir = copy(trained, tmp_path)
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 9, "loss": 1.2')  # a kill during the append
  assert resume(data_dir, workdir, num_steps=10)["step"] == 10
  assert sorted(logged(workdir)) == list(range(1, 11))
  cut = [json.loads(line) for line in open(os.path.join(workdir, "metrics.rewound.jsonl"))]
  assert cut == [{"cut_at_step": 8, "line": '{"step": 9, "loss": 1.2'}]


def test_rewind_log_keeps_every_line(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  lines = ['{"step": 1}', '{"step": 2}', '{"step": 3}', 'garbage', '{"step": 4']
  open(path, "w").write("\n".join(lines))
  assert metrics.rewind_log(path, 2) == 3
  assert open(path).read().splitlines() == lines[:2]
  assert [json.loads(l)["line"] for l in open(str(tmp_path / "metrics.rewound.jsonl"))] == lines[2:]


@pytest.mark.parametrize("key,value,kind,then_allow", [
    ("model.backbone.dim", 48, "structural", False), ("model.objective", "ddpm", "structural", False),
    ("model.clip_x0", 0.5, "structural", True), ("data.caption_dropout", 0.3, "data", True), ("seed", 3, "data", True)])
def test_a_resume_that_changes_the_config_is_refused_before_touching_anything(data_dir, trained, tmp_path, key, value,
                                                                             kind, then_allow):
  workdir = copy(trained, tmp_path)
  before = {n: open(os.path.join(workdir, n), "rb").read() for n in ("config.json", "metrics.jsonl")}
  config = tiny(data_dir, num_steps=10)
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(config_record.ConfigChangeError, match=f"{key}: .* \\({kind}\\)") as e:
    loop.train(config, workdir)
  assert ("reset_data_iterator=True" if kind == "data" else "allow_config_change=True") in str(e.value)
  assert {n: open(os.path.join(workdir, n), "rb").read() for n in before} == before
  assert steps_on_disk(workdir) == [4, 6, 8]
  if not then_allow:
    return
  config.train["reset_data_iterator" if kind == "data" else "allow_config_change"] = True
  assert loop.train(config, workdir)["step"] == 10
  (change,) = [json.loads(l) for l in open(os.path.join(workdir, config_record.CHANGES_FILE))]
  assert change["step"] == 8 and change["changes"][key][2] == kind
  assert change["data_iterator_reset"] == (kind == "data")
  assert config_record.load_config(workdir)[parents[0] if parents else leaf] is not None


def test_safe_overrides_and_moved_data_resume_and_are_recorded(data_dir, trained, tmp_path):
  workdir = copy(trained, tmp_path)
  moved = str(tmp_path / "moved_data")
  shutil.copytree(data_dir, moved)
  config = tiny(data_dir, num_steps=10, learning_rate=1e-3, checkpoint_every=5)
  config.data.data_dir = moved
  assert loop.train(config, workdir)["step"] == 10
  (change,) = [json.loads(l) for l in open(os.path.join(workdir, config_record.CHANGES_FILE))]
  assert {k: v[2] for k, v in change["changes"].items()} == {
      "train.num_steps": "safe", "train.learning_rate": "safe", "train.checkpoint_every": "safe",
      "data.data_dir": "path"}
  assert not change["data_iterator_reset"]
  assert config_record.load_config(workdir).data.image_slots == config.data.image_slots  # derived keys kept


def test_the_same_paths_with_other_files_are_a_data_change(data_dir, trained, tmp_path):
  workdir = copy(trained, tmp_path)
  record = json.load(open(os.path.join(workdir, "config.json")))
  record["data"]["tokenizer"] = "0" * 64  # as if the tokenizer was retrained in place
  json.dump(record, open(os.path.join(workdir, "config.json"), "w"))
  with pytest.raises(config_record.ConfigChangeError, match="<data files>"):
    resume(data_dir, workdir, num_steps=10)


class NonFiniteFrom:
  """Wraps the step: steps `first` … `first + count - 1` report a non-finite loss and keep the params and
  optimiser state, as the step does when it skips an update (the step count still advances)."""

  def __init__(self, step_fn, first: int, count: int):
    self.step_fn, self.first, self.count = step_fn, first, count

  def __call__(self, state, batch, rng):
    number = int(jax.device_get(state.step)) + 1
    if not self.first <= number < self.first + self.count:
      return self.step_fn(state, batch, rng)
    kept = jax.tree.map(jnp.copy, state)  # the step donates its input
    _, m = self.step_fn(state, batch, rng)
    return kept.replace(step=kept.step + 1), dict(jax.device_get(m), loss=np.float32(np.nan), finite=np.float32(0))


def inject_nan(monkeypatch, first, count=10**9):
  build = loop.build
  monkeypatch.setattr(loop, "build", lambda *a, **k: dataclasses.replace(
      setup := build(*a, **k), step=NonFiniteFrom(setup.step, first, count)))


def test_divergence_names_the_last_good_checkpoint_and_rewinds_to_it(data_dir, tmp_path, monkeypatch):
  """Good after 2 healthy steps, checkpoints every 2, keep 1: step 6 becomes good at step 8 and survives
  the rotation; NaN at step 9 stops the run naming it; the flag resumes from it. (Skipping on, with no skip
  allowed in a row: the first non-finite step is a divergence, and one compiled step serves the tests.)"""
  workdir = str(tmp_path / "diverging")
  train = dict(num_steps=12, keep_checkpoints=1, good_after_steps=2, skip_nonfinite=True, max_consecutive_skips=0)
  inject_nan(monkeypatch, first=9)
  with pytest.raises(FloatingPointError, match="last known good checkpoint is step 6.*rewind_to_last_good=True"):
    loop.train(tiny(data_dir, **train), workdir)
  assert steps_on_disk(workdir) == [6, 8]  # 8 newest, 6 spared as last known good
  assert json.load(open(os.path.join(workdir, health.DIVERGED_FILE)))["last_good"] == 6
  monkeypatch.undo()
  assert resume(data_dir, workdir, **train, rewind_to_last_good=True)["step"] == 12
  assert [n.split("-")[0] for n in os.listdir(os.path.join(workdir, "checkpoints", "rewound"))] == ["8"]
  assert not os.path.exists(os.path.join(workdir, health.DIVERGED_FILE))  # archived under a dated name
  assert glob.glob(os.path.join(workdir, "diverged-*.json"))
  # The flag left on (an auto-restarting scheduler) does not rewind a healthy run again.
  assert resume(data_dir, workdir, **train, rewind_to_last_good=True)["step"] == 12
  assert [n.split("-")[0] for n in os.listdir(os.path.join(workdir, "checkpoints", "rewound"))] == ["8"]
  assert 12 in steps_on_disk(workdir)


def test_skipping_stops_after_too_many_consecutive_skips_and_counts_them(data_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / "skipping")
  train = dict(num_steps=12, skip_nonfinite=True, max_consecutive_skips=2, log_every=4)
  inject_nan(monkeypatch, first=3, count=2)  # two skipped updates, then healthy again
  assert loop.train(tiny(data_dir, **train), workdir)["step"] == 12
  got = logged(workdir)
  assert got[4]["skipped_updates"] == 2 and got[8]["skipped_updates"] == 0
  assert got[12]["skipped_updates_total"] == 2 and np.isfinite(got[4]["loss"])  # the window averages finite steps
  monkeypatch.undo()
  inject_nan(monkeypatch, first=3)
  with pytest.raises(FloatingPointError, match="3 consecutive updates skipped"):
    loop.train(tiny(data_dir, **train), str(tmp_path / "stuck"))


def test_health_marks_good_only_after_clean_steps():
  h = health.Health(good_after=3, spike_factor=3.0, max_consecutive_skips=1, min_history=2)
  for s in range(1, 3):
    assert h.observe(s, 1.0, True) == (True, None)
  h.saved(2)
  assert h.observe(3, 1.0, True) == (True, None) and h.observe(4, 1.0, True) == (True, None)
  assert h.observe(5, 1.0, True) == (True, 2)
  h.saved(5)
  assert h.observe(6, 10.0, True) == (False, None)  # a spike: 5 is no longer a candidate
  assert h.candidates == []
  assert h.observe(7, float("nan"), False) == (False, None) and not h.too_many_skips
  assert h.observe(8, float("nan"), False) == (False, None) and h.too_many_skips


def test_a_failed_save_stops_the_run_naming_the_resume_point(data_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / "disk_full")
  save = checkpoint.ocp.CheckpointManager.save

  def failing(self, step, *args, **kwargs):
    if step == 6:
      raise OSError(28, "No space left on device")
    return save(self, step, *args, **kwargs)
  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", failing)
  with pytest.raises(checkpoint.CheckpointSaveError, match="step 6.*No space left.*resumes: step 4"):
    loop.train(tiny(data_dir), workdir)
  monkeypatch.undo()
  assert steps_on_disk(workdir) == [2, 4]
  assert resume(data_dir, workdir)["step"] == 8


def test_training_warns_once_per_reason_when_skips_pass_the_threshold(caplog):
  warned = set()
  with caplog.at_level("WARNING"):
    loop.warn_about_skips({"bad_image": 5, "corrupt": 1}, 95, 0.1, warned)  # 5% and 1%: quiet
    assert not caplog.text
    loop.warn_about_skips({"bad_image": 75, "corrupt": 1}, 24, 0.1, warned)
    loop.warn_about_skips({"bad_image": 80, "corrupt": 1}, 25, 0.1, warned)
  assert caplog.text.count("skipped as 'bad_image'") == 1 and "75%" in caplog.text
  assert "re-run prepare with --image_size" in caplog.text and "corrupt" not in caplog.text


def test_keys_another_version_added_are_accepted_and_a_legacy_dump_is_replaced(data_dir, tmp_path):
  config = tiny(data_dir)
  record = config_record.make_record(config)
  older = json.loads(json.dumps(record))
  del older["config"]["train"]["good_after_steps"]  # as written by a unimm without that key
  older["config"]["train"]["dropped_key"] = 1
  assert config_record.changes(older, record) == {"train.good_after_steps": "version", "train.dropped_key": "version"}
  json.dump(record["config"], open(tmp_path / "config.json", "w"))  # a legacy bare dump
  new, accepted, reset = config_record.check_resume(config, str(tmp_path))
  assert new == record and accepted == {} and not reset


def test_ema_turned_on_at_a_resume_starts_from_the_weights_and_sample_eval_use_it(data_dir, trained, tmp_path):
  """A checkpoint without an EMA resumes with `train.ema_decay` set: the EMA starts from its weights, is kept
  in the checkpoints, and is what `load_trained` (sample, eval) gives unless asked for the raw weights; the
  EMA turned off again, that checkpoint still restores (its EMA is ignored)."""
  from unimm import main  # pylint: disable=g-import-not-at-top
  workdir = copy(trained, tmp_path)
  resume(data_dir, workdir, num_steps=10, checkpoint_every=1, ema_decay=0.5)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  params = {s: jax.tree.map(lambda x: np.asarray(x, np.float64), ckpt.restore_params(s)) for s in (8, 9, 10)}
  assert ckpt.restore_ema(8) is None and ckpt.restore_ema(10) is not None
  # β = min(0.5, (1 + n) / (10 + n)) = 0.5 for updates n = 8, 9, from the weights of step 8.
  want = jax.tree.map(lambda p8, p9, p10: 0.5 * (0.5 * p8 + 0.5 * p9) + 0.5 * p10, params[8], params[9], params[10])
  got = ckpt.restore_ema(10)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-6), got, want)
  assert json.loads(open(os.path.join(workdir, "config_changes.jsonl")).readlines()[-1])["changes"][
      "train.ema_decay"] == [0.0, 0.5, "safe"]
  config = tiny(data_dir, ema_decay=0.5)
  _, averaged, _, step = main.load_trained(config, workdir)
  _, raw, _, _ = main.load_trained(config, workdir, ema=False)
  assert step == 10
  jax.tree.map(lambda a, g: np.testing.assert_array_equal(np.asarray(a), np.asarray(g)), averaged, got)
  jax.tree.map(lambda r, p: np.testing.assert_array_equal(np.asarray(r, np.float64), p), raw, params[10])
  assert resume(data_dir, workdir, num_steps=11, checkpoint_every=1)["step"] == 11
  assert steps_on_disk(workdir)[-1] == 11
  assert ckpt.restore_ema(11) is None
