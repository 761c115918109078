"""Golden per-step losses of every family's tiny config, to prove a refactor changes no number.

    python tools/goldens.py record [--out tools/goldens.json] [--demo]   # on the code before the change
    python tools/goldens.py check [--golden tools/goldens.json] [--demo] # after it: bit-for-bit, or a diff
    python tools/goldens.py record|check --demo_only                     # the demo alone (~15 minutes)

Each run goes through the real CLI (`python -m unimm.main`) for 20 steps with every step logged, on the
embedded data's small builder configs in one data dir (`--data_dir`, default ~/.cache/unimm/goldens: the
tokenizers trained there once are reused, so record and check read the same ids). The codec runs come
first and are the codecs of the runs after them: the KL-VAE (kl_vae) feeds Transfusion-with-a-VAE, the VQ
tokenizer (vq) feeds Chameleon and Janus, SigLIP feeds Janus, whose stages I → II → III each start from
the one before (`train.init_from`). `--demo` also runs the README demo command to its end (about 15
minutes on 2 cores) and compares its final eval metrics. CPU only; about 9 minutes without the demo.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 20
DDPM_V = ("--config.model.objective=ddpm", "--config.model.prediction=v")
SMALL_VIT = ("--config.model.vision.width=16", "--config.model.vision.depth=1", "--config.model.vision.num_heads=2",
             "--config.model.vision.mlp_dim=32")


def runs(root: str) -> list[tuple[str, str, tuple[str, ...]]]:
  """(name, config, extra flags) in the order they must run: each codec before its users."""
  ckpt = lambda name: f"{root}/{name}/checkpoints"  # pylint: disable=unnecessary-lambda-assignment
  janus = (f"--config.model.vision.checkpoint={ckpt('siglip')}", f"--config.model.vq.checkpoint={ckpt('vq')}",
           *SMALL_VIT)
  return [
      ("kl_vae", "configs/vae/shapes.py", ("--config.data.batch_size=4",)),
      ("vq", "configs/tokenizers/tiny.py:shapes", ("--config.data.batch_size=4",)),
      ("siglip", "configs/siglip/tiny.py:shapes", ("--config.data.batch_size=8", *SMALL_VIT)),
      # The DDPM path as recorded (the demo's defaults moved to flow matching since).
      ("transfusion", "configs/transfusion/tiny.py", DDPM_V),
      ("transfusion_vae", "configs/transfusion/tiny.py:shapes_vae",
       (f"--config.model.autoencoder.checkpoint={ckpt('kl_vae')}", *DDPM_V)),
      ("chameleon", "configs/chameleon/tiny.py:shapes", (f"--config.model.vq.checkpoint={ckpt('vq')}",)),
      ("janus_stage1", "configs/janus/tiny.py:stage1", janus),
      ("janus_stage2", "configs/janus/tiny.py:stage2", (*janus, f"--config.train.init_from={ckpt('janus_stage1')}")),
      ("janus_stage3", "configs/janus/tiny.py:stage3", (*janus, f"--config.train.init_from={ckpt('janus_stage2')}")),
  ]


def small_data_flags(config: str, data_dir: str) -> list[str]:
  """The data dir and every source of `config` on its `small` builder config."""
  sys.path.insert(0, REPO)
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = config.partition(":")
  spec = importlib.util.spec_from_file_location("golden_cfg", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sources = module.get_config(arg or None).data.sources
  return [f"--config.data.data_dir={data_dir}", *[f"--config.data.sources.{s}.builder_config=small" for s in sources]]


def step_metrics(workdir: str) -> dict[str, dict[str, float]]:
  """{step: {metric: value}} for the losses and the gradient norm of every logged step."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row:
        out[str(row["step"])] = {k: v for k, v in row.items() if k.endswith("loss") or k == "grad_norm"}
  return out


def train(name: str, config: str, extra, root: str, data_dir: str) -> dict:
  workdir = os.path.join(root, name)
  cmd = [sys.executable, "-m", "unimm.main", f"--config={config}", f"--workdir={workdir}",
         *small_data_flags(config, data_dir), f"--config.train.num_steps={STEPS}", "--config.train.log_every=1",
         f"--config.train.checkpoint_every={STEPS}", "--config.train.sample_every=0",
         "--config.train.final_eval_examples=0", *extra]
  print(f"[{name}] {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    raise SystemExit(f"[{name}] failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
  return step_metrics(workdir)


def demo(root: str) -> dict:
  """The README demo command to its end (its own data dir and defaults): its final eval metrics."""
  workdir = os.path.join(root, "demo")
  out = subprocess.run([sys.executable, "-m", "unimm.main", "--config=configs/transfusion/tiny.py",
                        f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    raise SystemExit(f"[demo] failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
  with open(os.path.join(workdir, "eval.json")) as f:
    return json.load(f)


def measure(data_dir: str, with_demo: bool, demo_only: bool = False) -> dict:
  with tempfile.TemporaryDirectory(prefix="unimm-goldens-") as root:
    result = {"steps": STEPS, "runs": {} if demo_only else {name: train(name, config, extra, root, data_dir)
                                                            for name, config, extra in runs(root)}}
    if with_demo or demo_only:
      result["demo"] = demo(root)
  return result


def differences(golden, got, path: str = "") -> list[str]:
  """Every leaf where `got` is not bit-for-bit `golden` (floats compared exactly; NaN equals NaN)."""
  if isinstance(golden, dict) and isinstance(got, dict):
    diffs = [f"{path}/{k}: missing" for k in golden if k not in got]
    diffs += [f"{path}/{k}: new" for k in got if k not in golden]
    for k in golden.keys() & got.keys():
      diffs += differences(golden[k], got[k], f"{path}/{k}")
    return diffs
  same = golden == got or (isinstance(golden, float) and isinstance(got, float)
                           and math.isnan(golden) and math.isnan(got))
  return [] if same else [f"{path}: {golden!r} → {got!r}"]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("command", choices=("record", "check"))
  parser.add_argument("--golden", "--out", dest="golden", default=os.path.join(REPO, "tools", "goldens.json"))
  parser.add_argument("--data_dir", default=os.path.expanduser("~/.cache/unimm/goldens"))
  parser.add_argument("--demo", action="store_true", help="also the README demo's final metrics (~15 min)")
  parser.add_argument("--demo_only", action="store_true",
                      help="only the demo; record keeps the file's runs, check compares the demo alone")
  args = parser.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  got = measure(args.data_dir, args.demo, args.demo_only)
  if args.demo_only:
    with open(args.golden) as f:
      got["runs"] = json.load(f)["runs"] if args.command == "record" else got["runs"]
  if args.command == "record":
    with open(args.golden, "w") as f:
      json.dump(got, f, indent=1, sort_keys=True)
    print(f"Recorded {len(got['runs'])} runs × {STEPS} steps{' and the demo' if args.demo or args.demo_only else ''} in {args.golden}.")
    return 0
  with open(args.golden) as f:
    golden = json.load(f)
  if not (args.demo or args.demo_only):
    golden.pop("demo", None)
  if args.demo_only:
    golden["runs"] = {}
  diffs = differences(golden, got)
  for d in diffs:
    print(d)
  print(f"{len(diffs)} differences from {args.golden}." if diffs else
        f"Bit-for-bit equal to {args.golden}: {len(got['runs'])} runs × {STEPS} steps"
        f"{' and the demo' if args.demo or args.demo_only else ''}.")
  return 1 if diffs else 0


if __name__ == "__main__":
  sys.exit(main())
