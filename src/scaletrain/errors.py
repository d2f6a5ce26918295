"""Errors meant for people. The CLI turns any `ScaletrainError` into one line on stderr and exit 2.

Messages name the config path or file at fault and say how to fix it. Imports nothing of ours.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Every exit code of `scaletrain` commands and `launch/train.py`, in one place.

    Anything not listed (1 from a traceback, or a signal's 128+N) is a crash and keeps its traceback.
    """

    OK = 0  # done
    DAMAGE = 1  # `inspect --verify` found a damaged tag; `parity` found a backend that diverges
    BAD_INPUT = 2  # config, paths, files: one line on stderr naming what and how to fix it
    LAUNCHER_GONE = 70  # EX_SOFTWARE: the worker's launcher died (SIGKILL of torchrun); nothing was committed
    STOP_UNSAVED = 74  # EX_IOERR: stopped by a signal but the stop-save failed; do not requeue blindly
    PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGUSR1/SIGTERM after saving; run again (or requeue) to resume


class ScaletrainError(Exception):
    """Bad input from the user: config, paths, files. Exit code 2, no traceback.

    `agreed` marks errors raised identically on every rank after the ranks agreed on them (a
    broadcast verdict): the CLI prints those once, from rank 0, instead of once per rank."""

    agreed: bool = False


class ConfigError(ScaletrainError):
    """A config key, value or combination is wrong."""


class DataError(ScaletrainError):
    """A data folder or file is missing or malformed."""


class CheckpointError(ScaletrainError):
    """A checkpoint cannot be written, found, trusted or read."""


class TrainingError(ScaletrainError):
    """The run cannot go on (too many non-finite steps in a row, say); the last good checkpoint stands."""
