"""Entry point for launchers: `torchrun launch/train.py ...`, `deepspeed launch/train.py --ds ...`,
`srun python launch/train.py ...`, or plain `python launch/train.py ...`.

Arguments are those of `scaletrain train`: [--config FILE] [--ds FILE] [key=value ...].
"""

import sys

from scaletrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
