#!/usr/bin/env bash
# Issue #12: the two SYNTHETIC phantom ablations of docs/results.md (shared 2-core CPU machine).
#   1. distillation on/off: student MAE-only vs distilled from the small phantom teacher, equal steps
#   2. engine.mode fused vs reference (distilled student), same seeds
# Usage: scripts/ablate_phantoms.sh OUT   (OUT/packed and OUT/teacher made first if missing)
set -euo pipefail
OUT=${1:-/tmp/issue12-abl}
PY=${PY:-.venv/bin/python}
export OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1
if [ ! -f "$OUT/packed/manifest.json" ]; then
  $PY -c "from fasttrain.converters.synthetic import generate_phantoms as g; g('$OUT/src', 2000, seed=0, size=128, workers=1, progress=False)"
  $PY -m fasttrain.cli convert nih --src "$OUT/src" --out "$OUT/packed" --format raw --size 64 --val-fraction 0.1
fi
if [ ! -f "$OUT/teacher/summary.json" ]; then
  $PY -m fasttrain.cli pretrain --config configs/ablate/teacher.yaml --out "$OUT/teacher" --data.path="$OUT/packed"
fi
T="$OUT/teacher/checkpoints/last.pt"
case "${2:-both}" in
  distill|both)
    $PY -m fasttrain.cli ablate --config configs/ablate/student.yaml --finetune-config configs/ablate/finetune.yaml \
      --grid "distill.teacher_ckpt=null,$T" --seeds 3 --out "$OUT/distill" --data.path="$OUT/packed" ;;&
  engine|both)
    $PY -m fasttrain.cli ablate --config configs/ablate/student.yaml --finetune-config configs/ablate/finetune.yaml \
      --grid "engine.mode=fused,reference" --seeds 3 --out "$OUT/engine" --data.path="$OUT/packed" \
      --distill.teacher_ckpt="$T" ;;
esac
