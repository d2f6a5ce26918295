"""torchrun for a Slurm job step: same arguments, two differences a preemptible job needs.

1. The agent ignores SIGUSR1. Slurm's `--signal=USR1@T` (and `scancel --signal=USR1 JOB`) signals
   every process of the job step: this agent and its workers. The workers turn SIGUSR1 into "finish
   the step, save, exit 75"; the agent has no handler for it, so by default it would die and leave
   its workers orphaned mid-save. Workers inherit the ignored disposition until the training loop
   installs its own handler, so a signal that arrives during start-up is dropped, not fatal.
2. The first failing worker's exit code passes through. torchrun exits 1 whenever a worker exits
   non-zero; this exits 75 when the first worker to exit left with 75 (saved after a stop request), so
   the batch script can tell a preemption from a crash and requeue, and 2 for bad input.

Usage (what torchrun.sbatch runs on each node): python torchrun_agent.py [torchrun args] train.py ...
Imports: torch.distributed.run only.
"""

import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main

EXIT_PREEMPTED = 75  # scaletrain.train.loop.EXIT_PREEMPTED; not imported so the agent needs no scaletrain


def run(argv: list[str]) -> int:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        torchrun_main(argv)
    except ChildFailedError as e:
        _, first = e.get_first_failure()
        if first.exitcode == EXIT_PREEMPTED:
            return EXIT_PREEMPTED
        print(e, file=sys.stderr)  # torchrun's failure table, without this wrapper's traceback
        return first.exitcode if first.exitcode > 0 else 128 - first.exitcode  # killed by signal N: 128+N
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
