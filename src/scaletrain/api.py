"""`scaletrain.fit`: one training run from Python, in the calling process.

`fit` takes a `Config`, a nested mapping, or a list of `key=value` strings, and runs exactly what
`scaletrain train` runs: as one process, or as one rank when the caller was started by torchrun (the
launch is read through `dist.current_launch`). It leaves the caller as it found it: the SIGTERM and
SIGUSR1 handlers are put back (they are installed only from the main thread), environment variables
it set are restored, and the process group it created is torn down before it returns or raises.
Imports: `scaletrain.config`, `scaletrain.dist`, `scaletrain.train.loop`, `scaletrain.train.callbacks`, `scaletrain.errors`.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from scaletrain import dist
from scaletrain.config import Config, build_config, load_config
from scaletrain.errors import ConfigError
from scaletrain.train.callbacks import Callback
from scaletrain.train.loop import RunResult, StopRequest, plan_run, train

# What dist.init may set for the process group's rendezvous; fit puts these back afterwards.
_ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT")
_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def as_config(config: Config | Mapping[str, Any] | Sequence[str]) -> Config:
    """A Config from a Config, a nested mapping ({"optim": {"lr": 1e-3}}) or `key=value` strings."""
    if isinstance(config, Config):
        return config
    if isinstance(config, Mapping):
        return build_config(config)
    if isinstance(config, (str, bytes)) or not all(isinstance(x, str) for x in config):
        raise ConfigError("fit: pass a Config, a nested dict, or a list of 'key=value' strings")
    return load_config(None, list(config))


def fit(config: Config | Mapping[str, Any] | Sequence[str], callbacks: Sequence[Callback] = ()) -> RunResult:
    """Train to completion (or a stop) and return the RunResult, with `latest_checkpoint` and
    `best_checkpoint` naming the tags the run's `ckpt/latest` and `ckpt/best` pointers name.

    Raises ScaletrainError subclasses for bad input, like the CLI's exit code 2."""
    import torch.distributed as tdist

    cfg = as_config(config)
    main_thread = threading.current_thread() is threading.main_thread()
    saved_handlers = {sig: signal.getsignal(sig) for sig in _SIGNALS} if main_thread else {}
    saved_env = {k: os.environ.get(k) for k in _ENV_KEYS}
    owns_group = not tdist.is_initialized()
    stop = StopRequest().install()
    try:
        launch = dist.current_launch()
        plan = plan_run(cfg, launch.world_size)
        ctx = dist.init(launch, timeout_s=cfg.backend.timeout_s)
        try:
            return train(plan, ctx, callbacks, stop=stop)
        finally:
            if owns_group:
                dist.teardown()
    finally:
        stop.restore()
        for sig, handler in saved_handlers.items():  # also after a stop, where restore() ignores them
            if handler is not None:
                signal.signal(sig, handler)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
