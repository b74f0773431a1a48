"""argparse for eej: one-line errors, and `--config FILE` on every command.

Bad input ends with a one-line `eej: error: ...` on stderr and exit status 2, never a traceback.
Every command takes `--config FILE`: a YAML mapping of its long option names to values (flags given
on the command line override the file), e.g. for `eej bench --config job.yaml --limit 2`:

    model: smollm2-135m
    questions: ../shared/data/eval/spec_bench.jsonl
    methods: plain
    peers: hf
    max_new_tokens: 256
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from typing import Any, Sequence

import yaml

EXIT_USAGE = 2


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors; a command parser with `enable_config()` also reads `--config FILE`."""

    _config_enabled = False

    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise CliError(message)

    def enable_config(self) -> None:
        """Add `--config FILE`: option values from a YAML file, overridden by flags on the command line."""
        self.add_argument(
            "--config", metavar="FILE",
            help="YAML file of option values (keys: long option names, - or _); flags given here override it",
        )
        self._config_enabled = True

    def parse_known_args(self, args=None, namespace=None):
        if self._config_enabled:
            args = list(sys.argv[1:] if args is None else args)
            path = _config_path(args)
            if path is not None:
                # The file's options go first: argparse keeps the last value given, so flags win.
                args = config_file_arguments(self, path) + args
        return super().parse_known_args(args, namespace)


def _config_path(args: Sequence[str]) -> str | None:
    """The FILE of `--config FILE` / `--config=FILE` among a command's arguments (before any `--`)."""
    found: list[str] = []
    for i, a in enumerate(args):
        if a == "--":
            break
        if a == "--config":
            if i + 1 >= len(args):
                raise CliError("argument --config: expected one argument")
            found.append(args[i + 1])
        elif a.startswith("--config="):
            found.append(a.partition("=")[2])
    if len(found) > 1:
        raise CliError("give --config once")
    return found[0] if found else None


def config_file_arguments(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """The command-line arguments equivalent to the option values in the YAML file `path`.

    Keys are `parser`'s long option names without the dashes (`max-new-tokens` or `max_new_tokens`);
    values are scalars, lists for options taking several values, booleans for flags. Unknown keys,
    values of the wrong type and method presets files are one-line errors naming the file and the key.
    """
    if os.path.isdir(path):
        raise CliError(f"config file {path} is a directory; give a YAML file")
    if not os.path.isfile(path):
        raise CliError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise CliError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
        except UnicodeDecodeError as e:
            raise CliError(f"{path}: not UTF-8 text ({e.reason}); save it as UTF-8") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise CliError(f"{path}: expected a mapping of option names to values")
    if "presets" in data:
        raise CliError(f"{path} holds method presets, not command options; use it as --method NAME:{path}")
    options: dict[str, argparse.Action] = {}
    for action in parser._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag not in ("--help", "--config"):
                options[flag[2:]] = action
    out: list[str] = []
    for key, value in data.items():
        name = str(key).replace("_", "-")
        if name not in options:
            close = difflib.get_close_matches(name, list(options), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise CliError(f"{path}: unknown option {key!r} for `{parser.prog}`{hint}")
        out += _option_arguments(options[name], name, value, f"{path}: {key}")
    return out


def _option_arguments(action: argparse.Action, name: str, value: Any, where: str) -> list[str]:
    """`--name value...` for one config entry, checked against the option's type and choices."""
    flag = f"--{name}"
    if value is None:
        return []
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise CliError(f"{where}: expected true or false, got {value!r}")
        return [flag] if value == isinstance(action, argparse._StoreTrueAction) else []
    if action.nargs == 0:
        raise CliError(f"{where}: this option takes no value")
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not many and len(values) != 1:
        raise CliError(f"{where}: expected one value, got a list")
    if many and action.nargs == "+" and not values:
        raise CliError(f"{where}: expected at least one value")
    texts = []
    for v in values:
        if isinstance(v, (dict, list)):
            raise CliError(f"{where}: expected a plain value, got {v!r}")
        text = str(v).lower() if isinstance(v, bool) else str(v)
        if action.type is not None:
            try:
                action.type(text)
            except argparse.ArgumentTypeError as e:
                raise CliError(f"{where}: {e}") from None
            except (TypeError, ValueError):
                raise CliError(f"{where}: invalid value {v!r} ({getattr(action.type, '__name__', 'value')} expected)") from None
        if action.choices is not None and text not in [str(c) for c in action.choices]:
            raise CliError(f"{where}: invalid choice {v!r} (choose from {', '.join(map(str, action.choices))})")
        texts.append(text)
    # `--name=value` keeps values that start with '-' from being read as options.
    return [flag, *texts] if many else [f"{flag}={texts[0]}"]
