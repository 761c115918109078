#!/usr/bin/env bash
# Issue 8's GPU figures (device tool, one H100): `attention` — the kernels on the mixed mask vs causal
# cuDNN (~5 min); `train` — Transfusion 1.4B and 0.37B train steps at T=4096, multimodal beside
# text-only (~7 min); `extra` — the 1.4B multimodal step with cuDNN's dense mask, with the kernel's
# atomic-dQ backward and with MaxText's XLA GPU flags (~7 min). A device call runs 10 minutes at most:
# one section per call, in that order.
#   bash bench/gpu_benchmarks.sh attention                # JSON lands in $OUT
#   SMOKE=1 bash bench/gpu_benchmarks.sh attention train extra   # tiny shapes, any backend: checks the script
# It starts with bench/kernel_check.py (the Pallas kernel's output and gradients against the dense
# reference on the card, every candidate block size, both backwards) and stops there, exit 3, when that
# fails: the reason is in $OUT/kernel_check.json / .err. SKIP_CHECK=1 skips it.
# Carry grain, ml-collections, clu, array-record and portpicker as wheels in .whl/ (the GPU image lacks them).
set -uo pipefail
if ! python3 -c "import grain, ml_collections, clu, array_record" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
OUT=${OUT:-/tmp/unimm_gpu_out}
mkdir -p "$OUT"
SECTIONS=${*:-attention}
GPU_FLAGS=$(cd launch && python3 -c "import slurm; print(slurm.GPU_XLA_FLAGS)")
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true) | tee "$OUT/gpu.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
# cuDNN's dense mask where there is a GPU; XLA's elsewhere (SMOKE runs of this script on a CPU).
DENSE=$(python3 -c "import jax; print('cudnn' if jax.default_backend() == 'gpu' else 'xla')" 2>/dev/null)
if [ -n "${SMOKE:-}" ]; then
  CHECK=(--batch=1 --seq_len=128 --heads=2 --kv_heads=1 --head_dim=16 --image_patches=16 --blocks=32x16x16)
  ATTN=(--batch=1 --seq_len=512 --heads=2 --image_patches=64 --steps=2)
  BIG=(--config=configs/transfusion/tiny.py --steps=2); SMALL=("${BIG[@]}")
else
  CHECK=()
  ATTN=(--steps=10 --pallas_blocks=64x64x32,128x128x64)
  SMALL=(--config=configs/transfusion/370m.py --batch=8 --seq_len=4096 --steps=8)
  BIG=(--config=configs/transfusion/1_4b.py --batch=4 --seq_len=4096 --steps=8)
fi
run() {  # name, timeout, command...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$OUT/$name.json" 2> "$OUT/$name.err"
  echo "rc=$?"; tail -c 3000 "$OUT/$name.json"; tail -3 "$OUT/$name.err"
}
if [ -z "${SKIP_CHECK:-}" ]; then
  run kernel_check 240 python3 bench/kernel_check.py "${CHECK[@]}"
  if ! grep -q '"failed": 0' "$OUT/kernel_check.json"; then
    echo "kernel_check failed: the Pallas kernel is wrong or does not compile here (rows with ok=false in"
    echo "$OUT/kernel_check.json, the traceback in $OUT/kernel_check.err); nothing else was run."
    exit 3
  fi
fi
for section in $SECTIONS; do
  case $section in
    attention)
      run attention 300 python3 bench/attention.py "${ATTN[@]}" ;;
    train)
      # The Pallas kernel by name: `auto` picks cuDNN's dense mask on GPU until the kernel has run there.
      run train_1_4b 280 python3 bench/train_step.py "${BIG[@]}" --set model.backbone.remat=qkv_attention \
          --set model.backbone.attention=pallas
      run train_370m 220 python3 bench/train_step.py "${SMALL[@]}" --set model.backbone.attention=pallas ;;
    extra)
      run train_1_4b_dense 150 python3 bench/train_step.py "${BIG[@]}" --runs=multimodal \
          --set model.backbone.remat=qkv_attention --set model.backbone.attention="$DENSE"
      run train_1_4b_pallas_atomic 150 python3 bench/train_step.py "${BIG[@]}" --runs=multimodal \
          --set model.backbone.remat=qkv_attention --set model.backbone.attention=pallas_atomic
      XLA_FLAGS="$GPU_FLAGS" run train_1_4b_xla_flags 150 python3 bench/train_step.py "${BIG[@]}" --runs=multimodal \
          --set model.backbone.remat=qkv_attention ;;
    *) echo "unknown section $section (attention, train, extra)"; exit 2 ;;
  esac
done
