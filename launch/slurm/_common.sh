# Shared by torchrun.sbatch and deepspeed.sbatch (sourced, not run): knobs, the head node, running
# the training step so that signals and exit codes reach the batch shell, and the requeue on exit 75.
# Every knob is an environment variable with a default; see docs/clusters.md for the table.

EXIT_PREEMPTED=75     # scaletrain's exit code after a signal-triggered save (ExitCode.PREEMPTED)
EXIT_STOP_UNSAVED=74  # stopped by a signal but the save failed (ExitCode.STOP_UNSAVED): never requeue

# The repository root: SCALETRAIN_ROOT, else the submit folder, else this file's own location. The
# sbatch scripts find this file the same way; the check gives one clear line instead of "No such file".
find_root() {
  local r
  for r in "${SCALETRAIN_ROOT:-}" "${SLURM_SUBMIT_DIR:-}" "$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." 2>/dev/null && pwd)"; do
    if [[ -n $r && -f $r/launch/train.py ]]; then
      echo "$r"
      return 0
    fi
  done
  echo "scaletrain-slurm: cannot find the repository (no launch/train.py under SCALETRAIN_ROOT," \
    "SLURM_SUBMIT_DIR or the script's folder); set SCALETRAIN_ROOT=/path/to/scaletrain" >&2
  return 2
}

# Rendezvous / MASTER_PORT: 20000-31999, below Linux's ephemeral range (32768-60999) so an outgoing
# connection cannot already hold it. The same job id after a requeue gives the same port.
master_port() {
  local job=${1:-0}
  echo $((20000 + job % 12000))
}

# After the training step: "requeue" only for exit 75 (saved after a stop), while requeueing is on and
# the job has been restarted fewer than max times; "stop" otherwise (74 = stop-save failed: a requeue
# would lose the steps since the last good checkpoint again and again).
requeue_decision() {
  local rc=$1 restarts=${2:-0} max=${3:-20} enabled=${4:-1}
  if [[ $rc == "$EXIT_PREEMPTED" && $enabled == 1 && $restarts -lt $max ]]; then
    echo requeue
  else
    echo stop
  fi
}

ROOT=$(find_root) || exit 2
if [[ -n ${SCALETRAIN_PYTHON:-} ]]; then
  PYTHON=$SCALETRAIN_PYTHON
elif [[ -x $ROOT/.venv/bin/python ]]; then
  PYTHON=$ROOT/.venv/bin/python
else
  PYTHON=python3
fi
TRAIN=$ROOT/launch/train.py
PORT=${SCALETRAIN_PORT:-$(master_port "${SLURM_JOB_ID:-0}")}
REQUEUE=${SCALETRAIN_REQUEUE:-1}
MAX_REQUEUES=${SCALETRAIN_MAX_REQUEUES:-20}
# srun --kill-on-bad-exit ends the step when a task fails, but it also SIGKILLs the ranks still
# finishing a preemption exit 75 (srun then reports 137 and the job is not requeued). Off by default:
# every rank of a stop exits 75 on its own; a crashed rank ends the others through the collective timeout.
KILL_ON_BAD_EXIT=${SCALETRAIN_KILL_ON_BAD_EXIT:-0}
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
  local rc=$1 restarts=${SLURM_RESTART_COUNT:-0}
  if [[ $(requeue_decision "$rc" "$restarts" "$MAX_REQUEUES" "$REQUEUE") == requeue ]]; then
    say "training stopped after saving (exit $rc): requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $MAX_REQUEUES)"
    scontrol requeue "$SLURM_JOB_ID" || say "scontrol requeue failed; resubmit to resume"
  elif [[ $rc == "$EXIT_PREEMPTED" ]]; then
    say "training stopped after saving (exit $rc) but not requeued (SCALETRAIN_REQUEUE=$REQUEUE, restart $restarts of SCALETRAIN_MAX_REQUEUES=$MAX_REQUEUES); resubmit to resume"
  elif [[ $rc == "$EXIT_STOP_UNSAVED" ]]; then
    say "training was stopped but its checkpoint save failed (exit $rc): not requeued; check the log and the disk, then resubmit"
  elif [[ $rc != 0 ]]; then
    say "training step failed with exit code $rc"
  fi
  exit "$rc"
}
