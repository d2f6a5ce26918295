"""User hooks named "pkg.module:function" in the config: imported by name, never evaluated.

Imports: `scaletrain.errors`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from scaletrain.errors import ConfigError


def import_callable(spec: str, key: str) -> Callable[..., Any]:
    """The function `spec` names; every failure is one ConfigError naming the config `key`."""
    module_name, func_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # an ImportError, or the module's own code failing at import
        msg = " ".join(str(e).split())
        raise ConfigError(f"{key}: cannot import module {module_name!r} ({type(e).__name__}: {msg}); "
                          "check the name and PYTHONPATH") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ConfigError(f"{key}: module {module_name!r} has no callable {func_name!r}")
    return fn
