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
OUT=${OUT:-$(mktemp -d)}
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
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

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

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device here; nothing to check (run it on a GPU machine)." | tee -a "$OUT/env.txt"
  exit 0
fi

# 1. CUDA-only tests (each skips itself, naming why, when its library is missing).
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout $(( $(left) / 3 )) "$PY" -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tee "$OUT/cuda_tests.txt" | tail -25
else
  echo "gpu_check: pytest missing, CUDA tests skipped" | tee "$OUT/cuda_tests.txt"
fi

# 2. Benchmarks at the paper's shapes (JSON lines), bounded by what is left of the budget.
timeout $(( $(left) - 20 )) "$PY" -m fasttrain.cli bench all --json --batch-size 256 --img-size 224 \
  --teacher mae_vit_base_patch16 --n-images 4096 > "$OUT/bench_all.jsonl" 2> "$OUT/bench_all.log"
echo "bench all: exit $? ($(wc -l < "$OUT/bench_all.jsonl") records; stderr tail below)"
tail -5 "$OUT/bench_all.log"

# 3. The short table, last.
echo
"$PY" -m fasttrain.cli bench summary "$OUT/bench_all.jsonl"
echo "gpu_check: done in $(( $(date +%s) - start )) s; full results in $OUT"
