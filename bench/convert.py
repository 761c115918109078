"""Times `python -m unimm.convert` on a random Llama-shaped checkpoint and reports its peak host memory.

    python bench/convert.py --workdir=/tmp/convert_bench [--shape=llama_1b] [--dtype=bfloat16]

The checkpoint is written here tensor by tensor (random bfloat16, as released checkpoints are stored;
sharded at 2 GiB) — nothing downloads. Prints one JSON line: the shape, the checkpoint's bytes, the
conversion's wall seconds and the converting process's peak resident memory (ru_maxrss of the child),
beside the size of one float32 copy of the params (what the converted checkpoint holds), then the same
for the export back to Hugging Face.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SHAPES = {  # Llama 3.2 1B's shape (tied embeddings), and a small one to try the script
    "llama_1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "medium": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=True),
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False),
}


def tensors(shape: dict, rng: np.random.Generator):
  d, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
  h = d // shape["num_attention_heads"]
  kv = shape["num_key_value_heads"] * h

  def rand(*dims):
    return (rng.standard_normal(dims, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
  yield "model.embed_tokens.weight", rand(v, d)
  for i in range(shape["num_hidden_layers"]):
    p = f"model.layers.{i}."
    yield p + "self_attn.q_proj.weight", rand(d, d)
    yield p + "self_attn.k_proj.weight", rand(kv, d)
    yield p + "self_attn.v_proj.weight", rand(kv, d)
    yield p + "self_attn.o_proj.weight", rand(d, d)
    yield p + "mlp.gate_proj.weight", rand(f, d)
    yield p + "mlp.up_proj.weight", rand(f, d)
    yield p + "mlp.down_proj.weight", rand(d, f)
    yield p + "input_layernorm.weight", np.ones(d, ml_dtypes.bfloat16)
    yield p + "post_attention_layernorm.weight", np.ones(d, ml_dtypes.bfloat16)
  yield "model.norm.weight", np.ones(d, ml_dtypes.bfloat16)
  if not shape["tie_word_embeddings"]:
    yield "lm_head.weight", rand(v, d)


def timed(command: list[str]) -> tuple[float, int]:
  """(wall seconds, the child's own peak RSS in bytes) of a command."""
  t0 = time.time()
  child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _, status, usage = os.wait4(child.pid, 0)
  if status:
    raise RuntimeError(f"{command} failed with status {status}")
  return time.time() - t0, usage.ru_maxrss * 1024


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--shape", default="llama_1b", choices=sorted(SHAPES))
  args = parser.parse_args()
  from unimm.convert import safetensors_io  # pylint: disable=g-import-not-at-top
  shape = SHAPES[args.shape]
  source, workdir, exported = (os.path.join(args.workdir, n) for n in ("hf", "unimm", "exported"))
  for path in (source, workdir, exported):
    shutil.rmtree(path, ignore_errors=True)
  files = safetensors_io.write_sharded(source, tensors(shape, np.random.default_rng(0)), 2 * 2 ** 30)
  with open(os.path.join(source, "config.json"), "w") as f:
    json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16",
               "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192, **shape}, f)
  checkpoint_bytes = sum(os.path.getsize(os.path.join(source, n)) for n in files)
  reader = safetensors_io.CheckpointReader(source)
  params = sum(int(np.prod(reader.shape(n))) for n in reader.keys()) + (
      shape["vocab_size"] * shape["hidden_size"] if shape["tie_word_embeddings"] else 0)  # the head, untied here
  seconds, peak = timed([sys.executable, "-m", "unimm.convert", f"--from_hf={source}", f"--workdir={workdir}",
                         "--seq_len=2048"])
  export_seconds, export_peak = timed([sys.executable, "-m", "unimm.convert", "--to_hf", f"--workdir={workdir}",
                                       f"--out={exported}"])
  print(json.dumps({"shape": args.shape, "params": params, "checkpoint_gb": round(checkpoint_bytes / 2 ** 30, 3),
                    "float32_copy_gb": round(4 * params / 2 ** 30, 3), "import_seconds": round(seconds, 1),
                    "import_peak_rss_gb": round(peak / 2 ** 30, 3), "export_seconds": round(export_seconds, 1),
                    "export_peak_rss_gb": round(export_peak / 2 ** 30, 3)}))


if __name__ == "__main__":
  main()
