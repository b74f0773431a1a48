"""The `eej` command line: it parses, then calls the library.

    eej generate ...        eej/cli/generate.py
    eej bench ...           eej/cli/bench.py
    eej distill ...         eej/cli/distill.py
    eej train METHOD ...    eej/cli/train.py

Bad input ends with a one-line `eej: error: ...` on stderr and exit status 2 (eej/cli/parser.py, which
also gives every command `--config FILE`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from eej.cli import bench, distill, generate, train
from eej.cli.parser import EXIT_USAGE, CliError, Parser

COMMANDS = {"generate": generate, "bench": bench, "distill": distill, "train": train}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="eej", description="Early-exit and self-speculative LLM decoding in JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, module in COMMANDS.items():
        command = sub.add_parser(name, help=module.__doc__.splitlines()[0])
        module.add_arguments(command)
        _enable_config_on_commands(command)
    return parser


def _enable_config_on_commands(parser: argparse.ArgumentParser) -> None:
    """`--config FILE` on every command that runs something (`eej train METHOD`, not `eej train`)."""
    nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not nested:
        parser.enable_config()
    for action in nested:
        for child in dict.fromkeys(action.choices.values()):
            _enable_config_on_commands(child)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        return COMMANDS[args.command].run(args)
    except CliError as e:
        print(f"eej: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError, OSError) as e:
        if os.environ.get("EEJ_DEBUG"):
            raise
        print(f"eej: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("eej: interrupted", file=sys.stderr)
        return 130
