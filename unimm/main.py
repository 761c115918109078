"""The unimm command line.

    python -m unimm.main --config=configs/transfusion/tiny.py --workdir=DIR [--mode=...]
    unimm --config=... --workdir=...                # the same, as a console script

Modes:
  train     (default) prepare, then train the config's model in the workdir;
            re-running the same command resumes from the latest checkpoint.
  prepare   write the config's embedded datasets (TFDS → ArrayRecord) and train
            its tokenizer if the tokenizer file does not exist yet.
  inspect   prepare, then pack a few training batches and show them: decoded
            rows, invariant checks, fill ratio, skip counts, and the rows'
            images as a PNG in the workdir.
  eval      evaluate the workdir's latest checkpoint on the embedded data
            (text→image, captioning, perplexity); writes WORKDIR/eval.json.
  sample    run --prompts=FILE (JSON lines) with the workdir's latest
            checkpoint; write --out=DIR/manifest.jsonl and PNGs
            (see unimm/inference/requests.py for the contract). A bad
            request gets an `error` line and the others still run; the
            exit status is 0 when every request succeeded, 3 when the run
            completed but some did not.
  compile   lower and compile the train step ahead of time for --topology
            (a TPU slice through libtpu, or fake CPU devices standing in for
            GPUs) and print its per-device memory, FLOPs and collectives;
            writes WORKDIR/compile.json and the compiled HLO
            (compile.hlo.txt) when --workdir is given.
  score     --inputs=FILE (JSON lines: {id, token_ids} or {id, parts}) → --out=DIR: each
            request's next-token logits (<id>.npy, float32 [T, V]) and manifest.jsonl
            with its summed log-likelihood; float32 by default (--dtype). See
            unimm/inference/score.py.
  params    print the model's parameter table without making a weight
            (eval_shape; seconds for a 7B config): path, shape, dtype,
            logical axes, partition spec and per-device shape on the
            config's mesh (over --topology's chips if given), weight decay,
            trains, count; totals by module and the matmul split; writes
            WORKDIR/params.json when --workdir is given.
Overrides: ``--config.data.seq_len=512``; variants: ``--config=FILE:digits``. Without --config, a
workdir's own config (its config.json, written by training or by `python -m unimm.convert`) is used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags
import numpy as np

from unimm import console
from unimm.inference import sampling

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (FILE[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for this run's outputs.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "prepare", "inspect", "sample", "eval", "score", "compile",
                                           "params"], "What to do.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "compile: the target (v5p-256, v5p:4x4x8, h100:64, cpu:8); "
                                "see unimm/train/compile.py. params: the chips the mesh spans (default: here).")
_EVAL_EXAMPLES = flags.DEFINE_integer("eval_examples", 200, "eval: test examples per task.")
_PROMPTS = flags.DEFINE_string("prompts", None, "sample: JSON-lines requests.")
_OUT = flags.DEFINE_string("out", None, "sample/score: output directory.")
# A list flag, like unimm.data.prepare's --inputs: both modules may be loaded in one process (tests).
_INPUTS = flags.DEFINE_list("inputs", None, "score: the JSON-lines requests file ({id, token_ids} or {id, parts}).",
                            allow_override=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "config"],
                           "score: the backbone's compute dtype (config: as the config says).")


def _define_sampling_flags(prefix: str, defaults: sampling.SamplingOptions, what: str) -> dict:
  """A flag per `SamplingOptions` field (`--{prefix}{field}`): a new option needs no flag written here."""
  define = {"int": flags.DEFINE_integer, "float": flags.DEFINE_float}
  return {f.name: define[f.type](prefix + f.name, getattr(defaults, f.name), f"sample: {f.metadata['help']}, {what}.")
          for f in dataclasses.fields(sampling.SamplingOptions)}


_TEXT_SAMPLING = _define_sampling_flags("", sampling.SamplingOptions(), "over text")
_CODE_SAMPLING = _define_sampling_flags("code_", sampling.CODE_DEFAULTS, "over image codes (code families)")
_DIFFUSION_STEPS = flags.DEFINE_integer("diffusion_steps", 250, "sample/eval: denoising steps (the paper: 250).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "sample/eval: classifier-free guidance scale "
                                "(default: config.model.guidance; 3, Janus 5).")
_IMAGES_PER_PROMPT = flags.DEFINE_integer("images_per_prompt", 1, "sample: images drawn in parallel per image request.")
_SAMPLER = flags.DEFINE_enum("sampler", None, ["ddim", "ddpm", "euler", "heun"],
                             "sample/eval: diffusion sampler (model.objective=ddpm: ddim | ddpm; flow: euler | heun); "
                             "default: the objective's first.")
_SEED = flags.DEFINE_integer("seed", 0, "sample: random seed.")
_EMA = flags.DEFINE_boolean("ema", True, "sample/eval: the EMA weights where the checkpoint holds them "
                            "(train.ema_decay > 0); --ema=false: the raw weights.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-process: HOST:PORT of process 0 "
                                   "(with --num_processes, --process_id; unset: detected on SLURM/TPU/MPI).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-process: how many processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-process: this process's index.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "auto: the flags above, else a detected cluster; on: let JAX detect it (TPU pods).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout", 100, "multi-process: seconds without a heartbeat after "
                                  "which a process counts as dead and every other one aborts.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 4, "inspect: batches to pack and measure.")
_SHOW_ROWS = flags.DEFINE_integer("show_rows", 2, "inspect: rows to print.")


def prepare(config) -> None:
  """Writes embedded datasets and trains the tokenizer, each only if missing."""
  from unimm.data import pipeline, sources, tokenizer  # pylint: disable=g-import-not-at-top
  d = config.data
  for name in sorted(d.sources.keys()):
    spec = d.sources[name]
    if spec.get("kind") == "tfds":
      sources.prepare_embedded(spec, d.data_dir)
  path = pipeline.tokenizer_path(d)
  if os.path.exists(path):
    logging.info("Tokenizer %s exists; not retraining.", path)
    return
  t0 = time.time()

  def texts():
    per_source = max(1, int(d.tokenizer.train_documents) // max(1, len(d.sources)))
    for name in sorted(d.sources.keys()):
      yield from sources.iter_texts(d.sources[name], "train", d.data_dir, per_source)

  tok = tokenizer.train_tokenizer(texts(), path, vocab_size=int(d.tokenizer.vocab_size),
                                  model_type=d.tokenizer.model_type,
                                  builtin_specials=bool(d.tokenizer.get("builtin_specials", True)))
  logging.info("Trained tokenizer %s (vocab %d) in %.1fs.", path, tok.vocab_size, time.time() - t0)


def inspect(config, workdir: str) -> dict:
  """Packs a few batches; prints and checks them; returns the summary it prints."""
  from unimm import imaging  # pylint: disable=g-import-not-at-top
  from unimm.data import documents, packed, pipeline  # pylint: disable=g-import-not-at-top
  prepare(config)
  tok = pipeline.load_tokenizer(config.data)
  sp = tok.specials
  t0 = time.time()
  it = pipeline.build_pipeline(config, "train")
  batches = [next(it) for _ in range(_NUM_BATCHES.value)]
  elapsed = time.time() - t0
  for batch in batches:
    for r in range(batch["tokens"].shape[0]):
      packed.check_row({k: v[r] for k, v in batch.items() if k != "stats"}, boi=sp.boi, eoi=sp.eoi, img=sp.img)
  first = batches[0]
  for r in range(min(_SHOW_ROWS.value, first["tokens"].shape[0])):
    print(f"--- row {r}: {int(first['segment_ids'][r].max())} documents, "
          f"{int(first['image_valid'][r].sum())} images")
    for line in describe_row({k: v[r] for k, v in first.items() if k != "stats"}, tok):
      print("  " + line)
  segs = np.concatenate([b["segment_ids"] for b in batches])
  summary = {
      "batches": len(batches), "batch_shape": list(first["tokens"].shape),
      "fill_ratio": float((segs > 0).mean()),
      "documents_per_row": float(np.mean([b["segment_ids"].max(axis=1).mean() for b in batches])),
      "images_per_row": float(np.mean([b["image_valid"].sum(axis=1).mean() for b in batches])),
      "skipped": {r: int(sum(b["stats"][r].sum() for b in batches)) for r in documents.SKIP_REASONS},
      "seconds": round(elapsed, 2), "vocab_size": tok.vocab_size,
  }
  os.makedirs(workdir, exist_ok=True)
  image_path = os.path.join(workdir, "packed_images.png")
  imaging.save_image_grid(first["images"][first["image_valid"]], image_path)
  summary["images_png"] = image_path
  print(json.dumps(summary, indent=1))
  return summary


def describe_row(row: dict, tok) -> list[str]:
  """One line per document of a packed row, image slots shown as [image k: n slots, t_max]."""
  lines = []
  for s in range(1, int(row["segment_ids"].max()) + 1):
    where = np.nonzero(row["segment_ids"] == s)[0]
    pieces, run = [], []
    i = 0
    while i < len(where):
      t = where[i]
      k = int(row["image_ids"][t])
      if k:
        n = int((row["image_ids"] == k).sum())
        if run:
          pieces.append(tok.decode(run))
          run = []
        role = "written" if row["image_written"][k - 1] else "read"
        pieces.append(f"[image {k} ({role}): {n} slots, t_max {int(row['image_t_max'][k - 1])}]")
        i += n
        continue
      run.append(int(row["tokens"][t]))
      i += 1
    if run:
      pieces.append(tok.decode(run))
    trained = float(row["loss_weights"][where].sum())
    lines.append(f"doc {s} ({len(where)} tokens, {trained:g} weighted targets): " + " ".join(pieces))
  return lines


def load_trained(config, workdir: str, ema: bool = True):
  """(task, params, tokenizer, step) from the workdir's latest complete checkpoint; its EMA weights where
  it holds them (train.ema_decay > 0) unless `ema` is False."""
  from unimm import families  # pylint: disable=g-import-not-at-top
  from unimm.data import pipeline  # pylint: disable=g-import-not-at-top
  from unimm.train import checkpoint, step as step_lib  # pylint: disable=g-import-not-at-top
  tokenizer = pipeline.load_tokenizer(config.data)
  task = families.build_task(config, tokenizer.vocab_size, frozen_codec=families.load_frozen_codec(config))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  step = ckpt.latest_step()
  converted = os.path.join(os.path.abspath(workdir), "converted")  # unimm.convert's weights of this workdir
  if step is None and config.train.init_from and os.path.abspath(config.train.init_from) == converted:
    return task, starting_params(config, task), tokenizer, 0
  if step is None:
    raise app.UsageError(f"no checkpoint in {workdir}/checkpoints: train first (--mode=train)")
  params = ckpt.restore_params(step)
  averaged = ckpt.restore_ema(step) if ema else None
  logging.info("Step %d: %s weights.", step, "the EMA" if averaged is not None else "the raw")
  return task, step_lib.with_ema(params, averaged), tokenizer, step


def starting_params(config, task):
  """The params a training run of `config` would start from (fresh, then train.init_from's grafted in):
  what a workdir written by `unimm.convert` serves before it trained."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from unimm.data import layout  # pylint: disable=g-import-not-at-top
  from unimm.train import loop  # pylint: disable=g-import-not-at-top
  batch = task.dummy_batch(1, int(config.data.seq_len), layout.image_shape_of(config.data))
  params = nn.unbox(jax.jit(task.init)(jax.random.key(int(config.seed)), batch))
  logging.info("No training checkpoint yet: the weights of %s (the rest fresh).", config.train.init_from)
  return loop.start_params(config, params)


def guidance(config) -> float:
  return float(config.model.guidance) if _GUIDANCE.value is None else _GUIDANCE.value


def check_sampler(task) -> None:
  """--sampler must sample the task's objective (a diffusion family's; code families have none to check)."""
  if _SAMPLER.value is not None and hasattr(task, "sampler"):
    try:
      task.sampler(_SAMPLER.value)
    except ValueError as e:
      raise app.UsageError(f"--sampler: {e}") from e


def evaluate(config, workdir: str, num_examples: int | None = None, diffusion_steps: int | None = None) -> dict:
  """--mode=eval (and the end of training): metrics on the embedded data → WORKDIR/eval.json, TensorBoard."""
  from unimm.eval import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  task, params, tokenizer, step = load_trained(config, workdir, _EMA.value)
  check_sampler(task)
  results = evaluate_lib.evaluate(config, task, params, tokenizer,
                                  num_examples=num_examples or _EVAL_EXAMPLES.value,
                                  diffusion_steps=diffusion_steps or _DIFFUSION_STEPS.value,
                                  guidance=guidance(config), seed=_SEED.value, out_dir=workdir, sampler=_SAMPLER.value)
  path = evaluate_lib.write(results, workdir, step)
  print(json.dumps(evaluate_lib.flatten(results), indent=1))
  logging.info("Wrote %s.", path)
  return results


def sample(config, workdir: str) -> list[dict]:
  """--mode=sample: requests → manifest and PNGs, from the workdir's latest checkpoint; the manifest rows."""
  if not _PROMPTS.value or not _OUT.value:
    raise app.UsageError("--mode=sample needs --prompts=FILE and --out=DIR")
  if _IMAGES_PER_PROMPT.value < 1:
    raise app.UsageError(f"--images_per_prompt={_IMAGES_PER_PROMPT.value}; expected 1 or more")
  import jax  # pylint: disable=g-import-not-at-top
  from unimm import families  # pylint: disable=g-import-not-at-top
  from unimm.inference import placement, requests  # pylint: disable=g-import-not-at-top
  try:
    requests.check_requests_file(_PROMPTS.value)  # before the minutes a checkpoint may take to load
  except OSError as e:
    raise app.UsageError(str(e)) from e
  task, params, tokenizer, _ = load_trained(config, workdir, _EMA.value)
  check_sampler(task)
  reqs = requests.parse_requests(_PROMPTS.value, task.image_shape, image_fit=read_image_fit(config))
  manifest = requests.run_requests(
      families.of(config), task, params, tokenizer, reqs, _OUT.value, context=int(config.data.seq_len),
      rng=jax.random.key(_SEED.value),
      sampling=sampling.SamplingOptions(**{k: f.value for k, f in _TEXT_SAMPLING.items()}),
      code_sampling=sampling.SamplingOptions(**{k: f.value for k, f in _CODE_SAMPLING.items()}),
      num_steps=_DIFFUSION_STEPS.value, guidance=guidance(config), sampler=_SAMPLER.value,
      placement=placement.Placement.from_config(config), images_per_prompt=_IMAGES_PER_PROMPT.value)
  failed = sum("error" in row for row in manifest)
  logging.info("Wrote %d results (%d errors) to %s.", len(manifest), failed, _OUT.value)
  if failed:
    logging.warning("%d of %d requests failed (see their `error` lines); exit status %d.", failed, len(manifest),
                    requests.SOME_FAILED)
  return manifest


def read_image_fit(config) -> str:
  fit = str(config.data.get("read_image_fit", "resize"))
  if fit not in ("resize", "crop", "pad"):
    raise app.UsageError(f"config.data.read_image_fit={fit!r}; expected resize, crop or pad")
  return fit


def score(config, workdir: str) -> list[dict]:
  """--mode=score: logits and log-likelihoods of --inputs → --out (see unimm/inference/score.py)."""
  if not _INPUTS.value or len(_INPUTS.value) != 1 or not _OUT.value:
    raise app.UsageError(f"--mode=score needs --inputs=FILE (one file, got {_INPUTS.value}) and --out=DIR")
  inputs = _INPUTS.value[0]
  from unimm.data import layout  # pylint: disable=g-import-not-at-top
  from unimm.inference import score as score_lib  # pylint: disable=g-import-not-at-top
  if _DTYPE.value != "config":  # a logit checker must not be limited by bfloat16
    config = copy_config(config)
    config.model.backbone.dtype = _DTYPE.value
  try:
    reqs = score_lib.parse(inputs, layout.image_shape_of(config.data), read_image_fit(config))
  except OSError as e:
    raise app.UsageError(str(e)) from e
  task, params, tokenizer, _ = load_trained(config, workdir, _EMA.value)
  vocab = max(int((config.get("hf") or {}).get("vocab_size", 0)), tokenizer.vocab_size)
  manifest = score_lib.run(task, params, tokenizer, config, reqs, _OUT.value, vocab)
  failed = sum("error" in row for row in manifest)
  logging.info("Scored %d requests (%d errors) into %s.", len(manifest), failed, _OUT.value)
  return manifest


def copy_config(config):
  import copy  # pylint: disable=g-import-not-at-top
  out = copy.deepcopy(config)
  out.unlock()
  return out


def compile_step(config, workdir: str | None) -> dict:
  """--mode=compile: the train step compiled for --topology, without that hardware (see unimm/train/compile.py)."""
  if not _TOPOLOGY.value:
    raise app.UsageError("--mode=compile needs --topology (v5p-256, v5p:4x4x8, h100:64, cpu:8)")
  import jax  # pylint: disable=g-import-not-at-top
  from unimm.train import compile as compile_lib  # pylint: disable=g-import-not-at-top
  _, physical, count = compile_lib.parse_topology(_TOPOLOGY.value)  # one slice's
  if physical == "cpu":
    jax.config.update("jax_num_cpu_devices", count)  # before the CPU backend starts
  else:
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling touches no chip
  if workdir:
    os.makedirs(workdir, exist_ok=True)
  report = compile_lib.compile_train_step(config, _TOPOLOGY.value,
                                          os.path.join(workdir, "compile.hlo.txt") if workdir else None)
  text = json.dumps(report, indent=1)
  print(text)
  if workdir:
    with open(os.path.join(workdir, "compile.json"), "w") as f:
      f.write(text + "\n")
  return report


def params_table(config, workdir: str | None) -> dict:
  """--mode=params: the parameter table (see unimm/train/param_table.py)."""
  import jax  # pylint: disable=g-import-not-at-top
  from unimm.data import pipeline  # pylint: disable=g-import-not-at-top
  from unimm.train import compile as compile_lib, param_table  # pylint: disable=g-import-not-at-top
  # A declared vocabulary needs no tokenizer on this machine (families.text_vocabulary).
  vocab = None if int(config.model.vocab_size) else pipeline.load_tokenizer(config.data).vocab_size
  devices = compile_lib.parse_topology(_TOPOLOGY.value)[2] if _TOPOLOGY.value else jax.device_count()
  rows = param_table.param_rows(config, vocab, devices)
  totals = param_table.summary(rows, dict(zip(("data", "fsdp", "tensor", "sequence"),
                                              (int(v) for v in _mesh_sizes(config, devices)))))
  print(param_table.format_table(rows, totals))
  result = {"rows": rows, "totals": totals}
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "params.json"), "w") as f:
      json.dump(result, f, indent=1, default=str)
  return result


def _mesh_sizes(config, devices: int) -> tuple:
  from unimm.parallel import sharding  # pylint: disable=g-import-not-at-top
  return sharding.mesh_shape(config.mesh, devices)


def jax_process_index() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index()


def main(argv):
  del argv
  console.setup(_WORKDIR.value, console.process_index(_PROCESS_ID.value, _DISTRIBUTED.value))
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required (e.g. --config=configs/transfusion/tiny.py) unless --workdir holds "
                         "a config.json (written by training or by python -m unimm.convert)")
  if _MODE.value == "prepare":
    prepare(config)
    return
  if _MODE.value == "compile":
    compile_step(config, _WORKDIR.value)
    return
  if _MODE.value == "params":
    params_table(config, _WORKDIR.value)
    return
  if not _WORKDIR.value:
    raise app.UsageError(f"--workdir is required for --mode={_MODE.value}")
  if _MODE.value == "inspect":
    inspect(config, _WORKDIR.value)
    return
  if _MODE.value != "train" and (_COORDINATOR.value or _NUM_PROCESSES.value):
    raise app.UsageError(f"--mode={_MODE.value} runs as one process; the multi-process flags are for training")
  if _MODE.value == "sample":
    from unimm.inference import requests  # pylint: disable=g-import-not-at-top
    return requests.exit_code(sample(config, _WORKDIR.value))  # app.run exits with it
  if _MODE.value == "eval":
    evaluate(config, _WORKDIR.value)
    return
  if _MODE.value == "score":
    from unimm.inference import requests  # pylint: disable=g-import-not-at-top
    return requests.exit_code(score(config, _WORKDIR.value))
  from unimm.parallel import distributed  # pylint: disable=g-import-not-at-top
  from unimm.train import loop  # pylint: disable=g-import-not-at-top
  multiprocess = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                        _HEARTBEAT.value, _DISTRIBUTED.value)
  # Process 0 writes the embedded data first; then the others find it (shared storage) or write their own.
  if jax_process_index() == 0:
    prepare(config)
  distributed.barrier("prepared")
  if jax_process_index() != 0:
    prepare(config)
  result = loop.train(config, _WORKDIR.value)
  print(json.dumps(result))
  if result.get("preempted"):
    return  # preempted: saved, and nothing else (the final evaluation belongs to a finished run)
  from unimm.train import settings  # pylint: disable=g-import-not-at-top
  t = settings.TrainSettings.from_config(config.train)
  if t.final_eval_examples and multiprocess:
    logging.warning("Multi-process run: no final evaluation here; run --mode=eval as one process.")
  elif t.final_eval_examples:
    evaluate(config, _WORKDIR.value, t.final_eval_examples, t.final_eval_diffusion_steps)


WORKDIR_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workdir_config.py")


def with_workdir_config(argv: list[str]) -> list[str]:
  """`argv` with `--config=unimm/workdir_config.py:W` added when no --config is given and --workdir=W holds
  a config.json: every mode runs on a workdir alone, `--config.KEY=…` overrides included."""
  if any(a == "--config" or a.startswith("--config=") for a in argv):
    return argv
  workdir = None
  for i, a in enumerate(argv):
    if a.startswith("--workdir="):
      workdir = a.split("=", 1)[1]
    elif a == "--workdir" and i + 1 < len(argv):
      workdir = argv[i + 1]
  if workdir and os.path.exists(os.path.join(workdir, "config.json")):
    return [argv[0], f"--config={WORKDIR_CONFIG}:{os.path.abspath(workdir)}", *argv[1:]]
  return argv


def run():
  import sys  # pylint: disable=g-import-not-at-top
  app.run(main, argv=with_workdir_config(sys.argv))


if __name__ == "__main__":
  run()
