"""`python -m scaletrain ...` is the `scaletrain` command (and lets torchrun start it with `-m scaletrain`)."""

import sys

from scaletrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
