"""The `scaletrain` subcommands, one module each: argparse (`add_command(subparsers)`) plus `run`, with
the logic in the library. `scaletrain.cli` lists them; nothing below this package imports it."""
