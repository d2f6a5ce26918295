"""scaletrain: one training loop for PyTorch models over DDP, FSDP2 and DeepSpeed ZeRO.

`scaletrain.fit(...)` trains from Python (see `scaletrain.api`); it is imported on first use, so
`import scaletrain` stays light (no torch). The built-in backends register here, so every use of the
config (`scaletrain.config.load_config`, ...) sees their sections: Python runs this module before any
other of the package, and it sits at the top of the layering (`scaletrain.engines.registry` explains).
"""

from typing import Any

from scaletrain.errors import CheckpointError, ConfigError, DataError, ScaletrainError

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "DataError", "ScaletrainError", "__version__", "fit"]


def fit(config: Any, callbacks: Any = ()) -> Any:
    """Train one run in this process; see `scaletrain.api.fit`."""
    from scaletrain.api import fit as _fit

    return _fit(config, callbacks)


# Last, so the names above exist while the built-in backends (ddp, fsdp, deepspeed) register.
from scaletrain.engines import registry as _registry  # noqa: E402, F401
