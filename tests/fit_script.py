"""`scaletrain.fit` as one rank under torchrun, recording what every rank sees (tests/ on PYTHONPATH).

Usage: torchrun --nproc_per_node=2 tests/fit_script.py OUT_JSON_PREFIX key=value ...
Each rank writes OUT_JSON_PREFIX.rank<N>.json: the lr of every step and the fit result's fields.
"""

from __future__ import annotations

import json
import sys

import scaletrain
from scaletrain.train.callbacks import Callback


class RecordLR(Callback):
    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def on_step_end(self, run, state, record):
        self.lrs[record["step"]] = record["lr"]


def main() -> None:
    prefix, overrides = sys.argv[1], sys.argv[2:]
    recorder = RecordLR()
    result = scaletrain.fit(overrides, callbacks=[recorder])
    import torch.distributed as dist

    assert not dist.is_initialized()  # fit tore down the group it created
    import os

    rank = int(os.environ["RANK"])
    with open(f"{prefix}.rank{rank}.json", "w") as f:
        json.dump({"lrs": recorder.lrs, "last_step": result.last_step,
                   "latest": str(result.latest_checkpoint)}, f)


if __name__ == "__main__":
    main()
