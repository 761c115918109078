#!/usr/bin/env bash
# The GPU figures of bench/train_step.py in one run (device tool): tiny, and Transfusion 0.37B at
# 8 × 4096 tokens with cuDNN's fused attention (dense mixed mask) and with plain XLA attention.
# Needs ml-collections carried as a wheel in .whl/ (the GPU image lacks it). JSON lands in $OUT.
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
OUT=${OUT:-/tmp/unimm_gpu_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
run() {  # name, args...
  local name=$1; shift
  echo "== $name"
  timeout 240 python3 bench/train_step.py "$@" > "$OUT/$name.json" 2> "$OUT/$name.err"
  echo "rc=$?"; cat "$OUT/$name.json"; tail -3 "$OUT/$name.err"
}
run tiny --config=configs/transfusion/tiny.py --steps=20
run 370m_cudnn --config=configs/transfusion/370m.py --batch=8 --seq_len=4096 --steps=10 --set model.backbone.attention=cudnn
run 370m_xla --config=configs/transfusion/370m.py --batch=8 --seq_len=4096 --steps=10 --set model.backbone.attention=xla
