#!/usr/bin/env bash
# The one command to run on a lent GPU machine (<= 8 minutes):
#   1. the CUDA-only tests (Triton kernels for real, DALI mixed decode, the compiled step on CUDA),
#   2. `fasttrain bench all` at the paper's shapes (ViT-T student + ViT-B teacher, 224 px),
#   3. a short table last; the full JSON and logs go to $OUT when it is set.
# That machine has its own python3 (torch 2.11, triton 3.6, timm, pytest...) and no registry:
# fasttrain runs from this source tree, and whatever is missing there is skipped, saying so.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }

# Source-tree layout: converters/ and kernels/ import as fasttrain.converters / fasttrain.kernels
# (setup.py package_dir). Without installing anything, mirror that mapping with symlinks.
SHIM=$(mktemp -d)/site
mkdir -p "$SHIM/fasttrain"
for f in "$ROOT"/fasttrain/*; do ln -s "$f" "$SHIM/fasttrain/$(basename "$f")"; done
ln -s "$ROOT/converters" "$SHIM/fasttrain/converters"
ln -s "$ROOT/kernels" "$SHIM/fasttrain/kernels"
# PYTHONSAFEPATH: `python -m`/`-c` must not put the cwd (this tree, whose fasttrain/ lacks kernels/
# and converters/) ahead of the shim (Python >= 3.11).
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1

{
  echo "== gpu_check $(date -u +%FT%TZ) git $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
  "$PY" - <<'PYEOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for m in ("triton", "timm", "ffcv", "nvidia.dali", "simplejpeg", "pydicom", "pytest"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m}: {getattr(mod, '__version__', 'present')}")
    except Exception as e:
        print(f"  {m}: MISSING ({type(e).__name__}) - its checks are skipped")
PYEOF
} 2>&1 | tee "$OUT/env.txt"

# GPU_CHECK_SMOKE=1 runs the same flow on a CPU at toy sizes (to check the script itself here).
SMOKE=${GPU_CHECK_SMOKE:-0}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && [ "$SMOKE" != 1 ]; then
  echo "gpu_check: no CUDA device here; nothing to check (run it on a GPU machine)." | tee -a "$OUT/env.txt"
  exit 0
fi

# 1. CUDA-only tests (each skips itself, naming why, when its library is missing).
if [ "$SMOKE" = 1 ]; then
  echo "gpu_check: smoke run on CPU, CUDA tests only collected" | tee "$OUT/cuda_tests.txt"
  "$PY" -m pytest -q --collect-only -m cuda -p no:cacheprovider tests 2>&1 | tail -2 | tee -a "$OUT/cuda_tests.txt"
elif "$PY" -c "import pytest" 2>/dev/null; then
  timeout $(( $(left) / 3 )) "$PY" -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tee "$OUT/cuda_tests.txt" | tail -25
else
  echo "gpu_check: pytest missing, CUDA tests skipped" | tee "$OUT/cuda_tests.txt"
fi

# 2. Benchmarks at the paper's shapes (JSON lines), most important first, each bounded so that a
#    slow one cannot eat the others' time. The data is SYNTHETIC phantoms packed by our converter.
J="$OUT/bench_all.jsonl"; : > "$J"
bench() {  # bench NAME SECONDS ARGS...
  local name=$1 secs=$2; shift 2
  (( secs > $(left) - 15 )) && secs=$(( $(left) - 15 ))
  if (( secs < 20 )); then echo "bench $name: skipped, out of time budget"; return; fi
  timeout "$secs" "$PY" -m fasttrain.cli bench "$name" --json "$@" >> "$J" 2> "$OUT/bench_$name.log"
  echo "bench $name: exit $? (limit ${secs}s)"; tail -3 "$OUT/bench_$name.log"
}
PAPER=(--img-size 224 --batch-size 256 --teacher mae_vit_base_patch16)
N_IMAGES=4096; PACK_SIZE=256; LOADER=(--batch-size 256 --img-size 224 --batches 8); KERNELS=(--shapes paper)
if [ "$SMOKE" = 1 ]; then
  PAPER=(--img-size 32 --batch-size 2 --teacher mae_vit_small_patch16 --steps 1 --windows 1 --no-compile)
  N_IMAGES=48; PACK_SIZE=32; LOADER=(--batch-size 4 --img-size 32 --batches 1 --windows 1)
  KERNELS=(--shapes small --no-compile --reps 2)
fi
bench step 150 "${PAPER[@]}"
DATA=$(mktemp -d)/packed
timeout 120 "$PY" -c "import sys; from pathlib import Path; from fasttrain.bench.step import make_synthetic_packed; print(make_synthetic_packed(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))" "$(dirname "$DATA")" $N_IMAGES $PACK_SIZE > "$OUT/packed.txt" 2> "$OUT/convert.log" \
  && DATA=$(tail -1 "$OUT/packed.txt") || { echo "synthetic conversion failed:"; tail -5 "$OUT/convert.log"; DATA=; }
if [ -n "$DATA" ]; then
  bench e2e 120 "${PAPER[@]}" --data "$DATA"
  bench loader 90 --data "$DATA" "${LOADER[@]}"
  # issue #11: Xiao et al.'s fine-tuning augmentation (bicubic crop + flip + RandAugment
  # rand-m6-mstd0.5-inc1) batched on the GPU; goal >= 50k augmented images/s from the raw loader
  bench loader 90 --data "$DATA" "${LOADER[@]}" --transform finetune --loaders reference,raw
fi
bench kernels 150 "${KERNELS[@]}"

# 3. The short table, last.
echo
"$PY" -m fasttrain.cli bench summary "$OUT/bench_all.jsonl"
echo "gpu_check: done in $(( $(date +%s) - start )) s; full results in $OUT"
