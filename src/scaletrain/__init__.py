"""scaletrain: one training loop for PyTorch models over DDP, FSDP2 and DeepSpeed ZeRO."""

from scaletrain.errors import CheckpointError, ConfigError, DataError, ScaletrainError

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "DataError", "ScaletrainError", "__version__"]
