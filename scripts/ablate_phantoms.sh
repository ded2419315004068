#!/usr/bin/env bash
# SYNTHETIC phantom ablations of docs/results.md (shared 2-core CPU machine).
#   distill    student MAE-only vs distilled from the small phantom teacher, equal steps
#   engine     engine.mode fused vs reference (distilled student), same seeds
#   both       distill, then engine (the default)
#   calibrate  the hard family's figures: random-init (teacher and student architectures), MAE-only
#              student, weak and strong teacher probes at the demo's scale (64 px, 8-px patches;
#              configs/demo/*.yaml). Random init, MAE-only student and strong teacher at CAL_SEEDS
#              seeds (default 3; seed 0's are the study's), then their means and the lifts
#              (OUT/calibrate.txt): one random encoder's probe moves with its init by ~0.02
#   study      on the hard family, 3 seeds, one `fasttrain ablate` (paired CIs between every two arms):
#              MAE only; distilled from the strong teacher at distill.alpha 0.5 / 1 / 2 / 10; from the
#              weak teacher at alpha 1 / 10; and the strong-teacher alpha-1 arm with engine.mode=reference
#              (the engine ablation). Pre-training and fine-tuning: configs/demo/{student,finetune}.yaml.
#              Also two probes of where distillation acts, strong teacher at alpha 10: an MLP projection
#              head, and the last blocks aligned (student 3, teacher 5) instead of 3/4 depth.
#              Needs calibrate first (the two teachers). JOBS=2 runs the arms in two processes.
#   labels10   the study's MAE-only and strong-teacher students fine-tuned on 10% of the labels (whole
#              patients; 100 epochs), pre-training reused (`ablate --pretrained-from`). Needs study first.
# Usage: DIFFICULTY=easy|hard scripts/ablate_phantoms.sh OUT [MODE]
#   OUT/packed and OUT/teacher are made first if missing; DIFFICULTY picks the phantom family
#   (`fasttrain convert synthetic --difficulty`, default easy: the recorded tables of the easy family).
set -euo pipefail
OUT=${1:-/tmp/phantom-abl}
MODE=${2:-both}
PY=${PY:-.venv/bin/python}
DIFFICULTY=${DIFFICULTY:-easy}
STRONG_EPOCHS=${STRONG_EPOCHS:-30}  # the strong teacher: configs/demo/teacher.yaml (128-d x 6) this long
WEAK_EPOCHS=${WEAK_EPOCHS:-2}  # the weak teacher: the same architecture, barely trained
CAL_SEEDS=${CAL_SEEDS:-3}  # calibrate: seeds of the random encoders, the MAE-only student and the strong teacher
export OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1
if [ ! -f "$OUT/packed/manifest.json" ]; then
  $PY -m fasttrain.cli convert synthetic --difficulty "$DIFFICULTY" --out "$OUT/src" --n 2000 --seed 0 --size 128 \
    --workers 1 --no-progress
  $PY -m fasttrain.cli convert nih --src "$OUT/src" --out "$OUT/packed" --format raw --size 64 --val-fraction 0.1
fi
probe() {  # probe NAME ARGS...: linear probe (fasttrain probe defaults); table in OUT/probe_NAME.txt
  echo "== $1"
  $PY -m fasttrain.cli probe --data "$OUT/packed" --out "$OUT/probe_$1" --bootstrap 1000 "${@:2}" \
    | tee "$OUT/probe_$1.txt"
}
pretrain() {  # pretrain NAME CONFIG SEED ARGS...: MAE pre-training (no distillation), once
  [ -f "$OUT/$1/summary.json" ] || $PY -m fasttrain.cli pretrain --config "$2" --out "$OUT/$1" \
    --data.path="$OUT/packed" --run.seed="$3" --run.progress=false "${@:4}"
}
teacher() {  # teacher NAME EPOCHS [SEED]: the demo teacher architecture pre-trained (MAE) for EPOCHS
  pretrain "$1" configs/demo/teacher.yaml "${3:-0}" --optim.epochs="$2"
}
case "$MODE" in
  calibrate)
    teacher teacher_weak "$WEAK_EPOCHS"
    probe teacher_weak --ckpt "$OUT/teacher_weak/checkpoints/last.pt"
    for s in $(seq 0 $((CAL_SEEDS - 1))); do
      x=$([ "$s" = 0 ] || echo "_s$s")  # seed 0 keeps the names the study reads
      probe "random_init$x" --random-init --config configs/demo/teacher.yaml --seed "$s"
      probe "random_init_student$x" --random-init --config configs/demo/student.yaml --seed "$s"
      pretrain "student_mae$x" configs/demo/student.yaml "$s"
      probe "student_mae$x" --ckpt "$OUT/student_mae$x/checkpoints/last.pt" --seed "$s"
      teacher "teacher_strong$x" "$STRONG_EPOCHS" "$s"
      probe "teacher_strong$x" --ckpt "$OUT/teacher_strong$x/checkpoints/last.pt" --seed "$s"
    done
    $PY scripts/calibrate_summary.py "$OUT" | tee "$OUT/calibrate.txt"
    exit 0 ;;
  study)
    S="distill.teacher_ckpt=$OUT/teacher_strong/checkpoints/last.pt"
    W="distill.teacher_ckpt=$OUT/teacher_weak/checkpoints/last.pt"
    common=(--config configs/demo/student.yaml --finetune-config configs/demo/finetune.yaml --seeds 3
            --out "$OUT/study" --data.path="$OUT/packed" --run.progress=false --run.tensorboard=false)
    A=(--arm "distill.teacher_ckpt=null" --arm "$S distill.alpha=0.5" --arm "$S distill.alpha=1.0"
       --arm "$S distill.alpha=2.0" --arm "$S distill.alpha=10.0 distill.proj=mlp")
    B=(--arm "$S distill.alpha=10.0" --arm "$W distill.alpha=1.0" --arm "$W distill.alpha=10.0"
       --arm "$S distill.alpha=1.0 engine.mode=reference"
       --arm "$S distill.alpha=10.0 distill.student_blocks=[3] distill.teacher_blocks=[5]")
    if [ "${JOBS:-1}" = 2 ]; then  # two processes on disjoint arm folders (one core each), then the report
      $PY -m fasttrain.cli ablate "${common[@]}" "${A[@]}" > "$OUT/study_A.log" 2>&1 &
      $PY -m fasttrain.cli ablate "${common[@]}" "${B[@]}" > "$OUT/study_B.log" 2>&1 &
      wait
    fi
    $PY -m fasttrain.cli ablate "${common[@]}" "${A[@]}" "${B[@]}"
    exit 0 ;;
  labels10)  # the study's encoders (MAE only; strong teacher alpha 1, 2, 10) fine-tuned on 10% of the labels
    S="distill.teacher_ckpt=$OUT/teacher_strong/checkpoints/last.pt"
    $PY -m fasttrain.cli ablate --config configs/demo/student.yaml --finetune-config configs/demo/finetune.yaml \
      --seeds 3 --out "$OUT/study_lf10" --pretrained-from "$OUT/study" --stages pretrain,finetune,evaluate \
      --data.path="$OUT/packed" --data.label_fraction=0.1 --optim.epochs=100 --run.progress=false \
      --run.tensorboard=false --arm "distill.teacher_ckpt=null" --arm "$S distill.alpha=1.0" \
      --arm "$S distill.alpha=2.0" --arm "$S distill.alpha=10.0"
    exit 0 ;;
esac
if [ ! -f "$OUT/teacher/summary.json" ]; then
  $PY -m fasttrain.cli pretrain --config configs/ablate/teacher.yaml --out "$OUT/teacher" --data.path="$OUT/packed"
fi
T="$OUT/teacher/checkpoints/last.pt"
case "$MODE" in
  distill|both)
    $PY -m fasttrain.cli ablate --config configs/ablate/student.yaml --finetune-config configs/ablate/finetune.yaml \
      --grid "distill.teacher_ckpt=null,$T" --seeds 3 --out "$OUT/distill" --data.path="$OUT/packed" ;;&
  engine|both)
    $PY -m fasttrain.cli ablate --config configs/ablate/student.yaml --finetune-config configs/ablate/finetune.yaml \
      --grid "engine.mode=fused,reference" --seeds 3 --out "$OUT/engine" --data.path="$OUT/packed" \
      --distill.teacher_ckpt="$T" ;;
esac
