"""`scaletrain plan --world N [--backends SPECS]`: bytes per rank for each backend, before launch;
without --backends, every registered backend and strategy (those that do not fit the world size or
the model are left out, with a note). Imports: rich, `scaletrain.config`, `scaletrain.engines` (`plan`,
`registry`), `scaletrain.errors`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from scaletrain.config import load_config
from scaletrain.engines.plan import Estimate, parse_backends, parse_bytes, plan_every_backend, plan_memory
from scaletrain.errors import ConfigError


def default_device_memory(procs_per_node: int) -> tuple[int, str]:
    """The CUDA device's memory, else this machine's memory divided among its processes."""
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory), "CUDA device 0"
    except Exception:
        pass
    import psutil

    return psutil.virtual_memory().total // procs_per_node, f"host memory / {procs_per_node} processes"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _table(rows: list[Estimate], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("backend", "params", "grads", "optimizer", "buffers", "activations", "device total", "host", "fits"):
        table.add_column(col, justify="left" if col in ("backend", "fits") else "right", no_wrap=True)
    for e in rows:
        fits = "-" if e.fits is None else ("[green]yes[/green]" if e.fits else "[red]NO[/red]")
        table.add_row(e.spec, *(_human(x) for x in (e.params, e.grads, e.optimizer, e.buffers, e.activations,
                                                     e.total, e.host)), fits)
    return table


def run(args: argparse.Namespace) -> int:
    if args.world < 1:
        raise ConfigError(f"--world {args.world}: expected a positive number of processes")
    if args.procs_per_node is not None and args.procs_per_node < 1:
        raise ConfigError(f"--procs-per-node {args.procs_per_node}: expected a positive number")
    cfg = load_config(args.config, args.overrides, ds_config=args.ds)
    procs = args.procs_per_node or args.world
    if args.device_memory is not None:
        limit, where = parse_bytes(args.device_memory), "--device-memory"
    else:
        limit, where = default_device_memory(procs)
    kw = {"procs_per_node": procs, "device_memory": limit}
    if args.backends:
        rows, left_out = [plan_memory(cfg, args.world, s, **kw) for s in parse_backends(args.backends)], []
    else:
        rows, left_out = plan_every_backend(cfg, args.world, **kw)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        for note in left_out:
            print(note, file=sys.stderr)
        return 0
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    n = rows[0].n_params if rows else 0
    title = (f"{n / 1e6:.2f} M parameters, world {args.world}, micro batch {cfg.train.micro_batch_size} x "
             f"{cfg.model.block_size}, {cfg.precision}; bytes of the rank holding the most; limit {_human(limit)} "
             f"({where})")
    console.print(_table(rows, title))
    for r in rows:
        for note in r.notes:
            console.print(f"[yellow]{r.spec}[/yellow]: {note}", highlight=False)
    for note in left_out:
        console.print(f"[yellow]{note}[/yellow]", highlight=False)
    return 0


def add_command(subparsers: Any) -> None:
    p = subparsers.add_parser("plan", help="memory per rank of each backend, before launch")
    p.add_argument("--config", type=Path, help="TOML/JSON/YAML config file")
    from scaletrain.engines.registry import DS_FLAG_HELP, default_specs

    p.add_argument("--ds", type=Path, help=DS_FLAG_HELP)
    p.add_argument("--world", type=int, required=True, help="number of processes (ranks)")
    p.add_argument("--backends", default=None,
                   help=f"comma-separated backend specs (default: every registered one: {','.join(default_specs())})")
    p.add_argument("--device-memory", default=None,
                   help="memory per device, e.g. 80GB (default: the CUDA device's, or host memory / processes)")
    p.add_argument("--procs-per-node", type=int, default=None,
                   help="processes per host (hybrid_shard groups, host memory share; default: --world)")
    p.add_argument("--json", action="store_true", help="machine-readable output instead of the table")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. model.n_layer=24")
    p.set_defaults(func=run)
