"""`scaletrain config show [--config FILE] [--ds FILE] [--json] [key=value ...]`: the resolved config,
as TOML (or JSON), and the config arguments every config-reading command shares.
Imports: `scaletrain.config`, `scaletrain.engines.registry`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML/JSON/YAML config file")
    from scaletrain.engines.registry import DS_FLAG_HELP

    p.add_argument("--ds", type=Path, help=DS_FLAG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4")


def run(args: argparse.Namespace) -> int:
    from scaletrain.config import config_to_toml, load_config

    cfg = load_config(args.config, args.overrides, ds_config=args.ds)
    if args.json:
        import json

        print(json.dumps(cfg.to_json_dict(), indent=2))
    else:
        print(config_to_toml(cfg), end="")
    return 0



def add_command(subparsers: Any) -> None:
    p = subparsers.add_parser("config", help="config tools")
    csub = p.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config")
    add_config_args(show)
    show.add_argument("--json", action="store_true", help="JSON instead of TOML")
    show.set_defaults(func=run)
