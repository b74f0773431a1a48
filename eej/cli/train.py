"""Train a method's add-ons: `eej train METHOD ...` (shared options, and a registry each trainer joins)."""

from __future__ import annotations

import argparse
import os
from typing import Callable

from eej.cli.parser import CliError, Parser

_TRAINERS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}
DEFAULT_DATA_DIR = os.path.join("..", "shared", "data", "train")


def register_trainer(
    name: str, add_arguments: Callable[[argparse.ArgumentParser], None], run: Callable[[argparse.Namespace], int]
) -> None:
    """Make `eej train NAME` available: `add_arguments` declares method options, `run` trains."""
    _TRAINERS[name] = (add_arguments, run)


def add_common_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", nargs="+", required=True, help="training files (e.g. ../shared/data/train/*.json)")
    p.add_argument("--out", required=True, help="run directory: checkpoints, logs, the trained artifact")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--max-examples", type=int, default=None, help="cap the number of training sequences")
    p.add_argument("--stop-at", type=int, default=None,
                   help="end at this step, with the learning-rate schedule of --steps (a shortened run; resumable)")
    p.add_argument("--checkpoint-every", type=float, default=300.0, help="seconds between checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def train_config_from_args(args: argparse.Namespace, **overrides):
    from eej.train.loop import TrainConfig

    if args.steps < 1 or args.batch_size < 1 or args.seq_len < 8:
        raise CliError("--steps and --batch-size must be >= 1 and --seq-len >= 8")
    stop_at = getattr(args, "stop_at", None)
    if stop_at is not None and not 1 <= stop_at <= args.steps:
        raise CliError(f"--stop-at must be in [1, --steps={args.steps}], got {stop_at}")
    fields = dict(
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=args.warmup,
        checkpoint_every_s=args.checkpoint_every, seed=args.seed, stop_at=stop_at,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def add_arguments(p: argparse.ArgumentParser) -> None:
    _load_trainers()
    sub = p.add_subparsers(dest="method", metavar="METHOD", parser_class=Parser)
    for name, (add_arguments, _) in _TRAINERS.items():
        sp = sub.add_parser(name)
        add_common_train_arguments(sp)
        add_arguments(sp)


def _load_trainers() -> None:
    import importlib

    for module in ("eej.train.kangaroo", "eej.train.skipdecode", "eej.train.specee", "eej.train.m2r2", "eej.train.moefy"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "method", None):
        raise CliError(f"name a method to train: {', '.join(_TRAINERS) or '(none available)'}")
    return _TRAINERS[args.method][1](args)
