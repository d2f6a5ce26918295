"""Train a tiny GPT from Python with `scaletrain.fit`, then evaluate its best checkpoint.

    python examples/fit_api.py [OUT_DIR]

Runs in one process on CPU in a few seconds; under `torchrun --nproc_per_node 2 examples/fit_api.py`
each process is one rank of the same run.
"""

import sys
from pathlib import Path

import scaletrain
from scaletrain.data.prepare import prepare
from scaletrain.train.callbacks import Callback

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/fit-example")
data = out / "data"
if not (data / "meta.json").is_file():
    prepare([], data, max_bytes=200_000)  # a small corpus from the built-in text


class PrintEval(Callback):
    def on_eval(self, run, state, val_loss):
        if run.is_main:
            print(f"step {state.step}: val_loss {val_loss:.3f}")


config = {
    "data": {"path": str(data)},
    "run": {"out_dir": str(out / "run")},
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32},
    "train": {"max_steps": 8, "micro_batch_size": 4, "eval_every": 4, "eval_steps": 2},
    "schedule": {"kind": "onecycle", "warmup_steps": 0},
    "checkpoint": {"every": 4},
    "logging": {"console": False},
}
result = scaletrain.fit(config, callbacks=[PrintEval()])
print("best:", result.best_checkpoint, "latest:", result.latest_checkpoint)

# Evaluate the weights of the last checkpoint again without training: key=value strings work too.
again = scaletrain.fit([f"data.path={data}", f"run.out_dir={out / 'run'}", "model.n_layer=2", "model.n_head=2",
                        "model.n_embd=32", "model.block_size=32", "train.eval_steps=2", "train.eval_only=true",
                        "logging.console=false"])
print(f"eval_only: val_loss {again.final_val_loss:.3f} at step {again.last_step}")
