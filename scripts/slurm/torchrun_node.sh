#!/usr/bin/env bash
# One SLURM task per node runs this: torchrun for the node's GPUs, rendezvous from SLURM_*.
#   srun --ntasks-per-node=1 scripts/slurm/torchrun_node.sh pretrain --config C --out RUN ...
# The fasttrain command gets `--resume auto`, so the first launch, every requeue and every
# torchrun restart (--max-restarts) use this one command line.
#
# Signals: SLURM sends --signal=USR1@120 (the time limit is near) or SIGTERM (pre-emption,
# scancel) to the processes of the step. The trainer catches both (run.preempt_signals), stops
# every rank at one step boundary, writes last.pt and exits with run.preempt_exit_code (75).
# torchrun itself would die on SIGUSR1 (it handles only TERM/INT/HUP/QUIT), so it is started
# with USR1 ignored and this script turns a USR1 into a SIGTERM for it; torchrun then forwards
# SIGTERM to its workers and waits --shutdown-timeout seconds for them to save. This script
# exits 75 after a signal, so the batch script knows to requeue.
set -euo pipefail

PYTHON=${PYTHON:-python}
PREEMPT_EXIT=${PREEMPT_EXIT:-75}   # = run.preempt_exit_code
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
MAX_RESTARTS=${MAX_RESTARTS:-3}    # elastic restarts of a node's worker group (a dead rank)
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-90}  # seconds workers get to write last.pt (< USR1's 120)
# the first node of the allocation hosts the c10d rendezvous
HEAD=${RDZV_HOST:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a SLURM job}" | head -n 1)}
# a port per job (requeues keep the job id), overridable when it collides
PORT=${RDZV_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 2000))}

got_signal=0
child=
forward() {
  got_signal=1
  [ -n "$child" ] && kill -TERM "$child" 2>/dev/null || true
}
trap forward USR1 TERM

(
  trap '' USR1   # inherited as "ignored" by torchrun (the workers install their own handler)
  exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD:$PORT" --rdzv-id="fasttrain-${SLURM_JOB_ID:-local}" \
    --max-restarts="$MAX_RESTARTS" --shutdown-timeout="$SHUTDOWN_TIMEOUT" \
    -m fasttrain.cli "$@" --resume auto
) &
child=$!
rc=0
# `wait` returns early when a trapped signal arrives: wait again until torchrun has exited
while :; do
  wait "$child" && rc=0 || rc=$?
  kill -0 "$child" 2>/dev/null || break
done
if [ "$got_signal" = 1 ]; then
  echo "torchrun_node.sh: pre-empted on $(hostname) (torchrun exit $rc); exiting $PREEMPT_EXIT" >&2
  exit "$PREEMPT_EXIT"
fi
exit "$rc"
