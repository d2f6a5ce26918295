# Shared by torchrun.sbatch and deepspeed.sbatch (sourced, not run): knobs, the head node, running
# the training step so that signals and exit codes reach the batch shell, and the requeue on exit 75.
# Every knob is an environment variable with a default; see docs/clusters.md for the table.

EXIT_PREEMPTED=75  # scaletrain's exit code after a signal-triggered save (loop.EXIT_PREEMPTED)

ROOT=${SCALETRAIN_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ -n ${SCALETRAIN_PYTHON:-} ]]; then
  PYTHON=$SCALETRAIN_PYTHON
elif [[ -x $ROOT/.venv/bin/python ]]; then
  PYTHON=$ROOT/.venv/bin/python
else
  PYTHON=python3
fi
TRAIN=$ROOT/launch/train.py
# The same job id after a requeue gives the same port, so nothing about the run changes but the step.
PORT=${SCALETRAIN_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
REQUEUE=${SCALETRAIN_REQUEUE:-1}
read -r -a SRUN_ARGS <<<"${SCALETRAIN_SRUN_ARGS:-}"
RUN_ARGS=()
[[ -n ${SCALETRAIN_RUN_DIR:-} ]] && RUN_ARGS=("run.out_dir=$SCALETRAIN_RUN_DIR")
mapfile -t NODES < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a Slurm job}")
HEAD=${SCALETRAIN_MASTER_ADDR:-${NODES[0]}}
NNODES=${SLURM_JOB_NUM_NODES:-${#NODES[@]}}

say() { echo "scaletrain-slurm: $*" >&2; }

# The signal normally goes straight to the job steps (#SBATCH --signal=USR1@T, no "B:"). If it reaches
# this shell instead (--signal=B:USR1@T, `scancel --batch` or `--full`), pass it on to the steps:
# bash would otherwise die of it and take the job with it.
forward_stop() {
  say "SIGUSR1 reached the batch shell: forwarding it to the job steps"
  scancel --signal=USR1 "$SLURM_JOB_ID" || say "scancel --signal=USR1 failed"
}

# Run the training step in the background so the trap runs at once, and return its exit code.
run_step() {
  trap forward_stop USR1
  "$@" &
  local pid=$! rc
  wait "$pid"
  rc=$?
  while kill -0 "$pid" 2>/dev/null; do  # `wait` returns early (>128) when a trapped signal arrives
    wait "$pid"
    rc=$?
  done
  trap - USR1
  return "$rc"
}

# Exit 75 means the run saved a checkpoint after a stop request: put the job back in the queue. The
# requeued job runs this script again with the same id and arguments and resumes from ckpt/latest.
finish() {
  local rc=$1
  if [[ $rc == "$EXIT_PREEMPTED" && $REQUEUE == 1 ]]; then
    say "training stopped after saving (exit $rc): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || say "scontrol requeue failed; resubmit to resume"
  elif [[ $rc != 0 ]]; then
    say "training step failed with exit code $rc"
  fi
  exit "$rc"
}
