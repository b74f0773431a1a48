"""Train a method's add-ons: `eej train METHOD ...` (the trainers are eej/train/<method>.py).

The options are generated from what the trainers declare (eej.train.trainers.option): the training
data (`DataOptions`), the optimisation (`TrainConfig`) and the method's own options dataclass;
`--model`, `--out` and `--no-progress` are the training function's other arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing

from eej.cli.parser import CliError, Parser
from eej.train.data import DataOptions
from eej.train.loop import TrainConfig, run_lock
from eej.train.trainers import flag_name, option_fields, trainers
from eej.weights.registry import load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="method", metavar="METHOD", parser_class=Parser)
    for name, spec in trainers().items():
        sp = sub.add_parser(name)
        sp.add_argument("--model", default="smollm2-135m")
        add_option_flags(sp, DataOptions)
        sp.add_argument("--out", required=True, help="run directory: checkpoints, logs, the trained artifact")
        add_option_flags(sp, TrainConfig)
        sp.add_argument("--no-progress", action="store_true")
        add_option_flags(sp, spec.options)


def add_option_flags(p: argparse.ArgumentParser, options: type) -> None:
    """`--FLAG` for every option field of the dataclass `options`: its type, default, choices and help."""
    hints = typing.get_type_hints(options)
    for field in option_fields(options):
        flag, help = f"--{flag_name(field)}", field.metadata["eej_option"]["help"]
        kind = hints[field.name]
        if kind is bool:
            p.add_argument(flag, action="store_true", help=help)
            continue
        if isinstance(kind, types.UnionType):  # X | None -> X
            kind = next(k for k in typing.get_args(kind) if k is not type(None))
        many = typing.get_origin(kind) is tuple  # tuple[X, ...]: one or more values
        kind = typing.get_args(kind)[0] if many else kind
        required = field.default is dataclasses.MISSING
        extra = {} if required else {"default": field.default}
        p.add_argument(flag, type=kind, nargs="+" if many else None, required=required, help=help,
                       choices=field.metadata.get("eej_setting", {}).get("choices"), **extra)


def options_from_args(options: type, args: argparse.Namespace):
    """The options dataclass `options` from the flags `add_option_flags` added."""
    return options(**{f.name: getattr(args, flag_name(f).replace("-", "_")) for f in option_fields(options)})


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "method", None):
        raise CliError(f"name a method to train: {', '.join(trainers())}")
    spec = trainers()[args.method]
    data, config, options = (options_from_args(cls, args) for cls in (DataOptions, TrainConfig, spec.options))
    with run_lock(args.out):  # the whole run: teacher caches and labels in OUT too, not only the checkpoints
        model = load_model(args.model, kernels="xla")  # what the trainers run (they switch to it themselves)
        trained = spec.train(model, data, args.out, options, config, progress=not args.no_progress)
    print(f"wrote {trained.artifact}", file=sys.stderr)
    return 0
