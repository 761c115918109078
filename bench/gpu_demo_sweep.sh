#!/usr/bin/env bash
# Variants of the README demo (tiny Transfusion on shapes), trained and evaluated side by side on one
# GPU (device tool) to choose the CPU demo's settings. Carry .whl (grain, tfds, clu, ml-collections and
# their missing deps as wheels) and .data (the prepared shapes dataset and tokenizer). JSON → $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD UNIMM_DATA_DIR=$PWD/.data XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_DEFAULT_MATMUL_PRECISION=highest  # float32 as on the CPU, no TF32
OUT=${OUT:-/tmp/unimm_sweep_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
common="model.prediction=v train.sample_every=0"
unet="model.patch_kind=unet model.unet_channels=(16,32,64)"
timeout "${SWEEP_TIMEOUT:-420}" python3 bench/demo_sweep.py --workdir=/tmp/sweep --parallel=4 \
  --variant="cf05=$common data.caption_first_prob=0.5" \
  --variant="cf05_unet=$common data.caption_first_prob=0.5 $unet" \
  --variant="cf05_d192=$common data.caption_first_prob=0.5 model.backbone.dim=192 model.backbone.num_heads=6 model.backbone.mlp_hidden=512" \
  --variant="cf05_lr2e-3=$common data.caption_first_prob=0.5 train.learning_rate=2e-3" \
  | tee "$OUT/sweep.jsonl"
for d in /tmp/sweep/*/; do echo "== $d"; tail -c 1500 "$d/sweep.log"; done > "$OUT/logs.txt" 2>&1
