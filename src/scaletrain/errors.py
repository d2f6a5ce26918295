"""Errors meant for people. The CLI turns any `ScaletrainError` into one line on stderr and exit 2.

Messages name the config path or file at fault and say how to fix it. Imports nothing of ours.
"""

from __future__ import annotations


class ScaletrainError(Exception):
    """Bad input from the user: config, paths, files. Exit code 2, no traceback."""


class ConfigError(ScaletrainError):
    """A config key, value or combination is wrong."""


class DataError(ScaletrainError):
    """A data folder or file is missing or malformed."""


class CheckpointError(ScaletrainError):
    """A checkpoint cannot be written, found, trusted or read."""


class TrainingError(ScaletrainError):
    """The run cannot go on (too many non-finite steps in a row, say); the last good checkpoint stands."""
