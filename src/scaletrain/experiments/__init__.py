"""Experiment tools built on whole training runs in child processes: `sweep` (Optuna) and `parity`
(the same run on several backends, compared)."""
