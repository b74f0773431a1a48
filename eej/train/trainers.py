"""The trainer registry, the options trainers declare, and the artifact a run writes.

A trainer is a library function, the same shape for every method (usable from a notebook):
`train_kangaroo(model, data: DataOptions, out_dir, options: KangarooTraining, run: TrainConfig,
progress=True) -> Trained`, registered once with `register_trainer(name, options=..., train=...)`.
Its options are a frozen dataclass whose fields are declared with `option(default, help, ...)`;
`eej train METHOD` offers those of `DataOptions`, `TrainConfig` and the method's options as flags
(eej/cli/train.py), and `save_trained` writes them back into the artifact as the command line that
repeats the run, every option explicit. Bad options and data are `TrainError`s.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import shlex
from typing import Any, Callable

from eej.settings import check_settings, setting
from eej.weights.artifacts import save_artifact
from eej.weights.registry import Model

# Modules that register trainers on import (imported on first use of the registry).
TRAINER_MODULES = ("eej.train.kangaroo", "eej.train.skipdecode", "eej.train.specee", "eej.train.m2r2", "eej.train.moefy")


class TrainError(ValueError):
    """Training options or data that cannot work: a one-line message saying what to change."""


# ----------------------------------------------------------------------------- declared options


def option(default: Any = dataclasses.MISSING, help: str | None = None, *, flag: str | None = None, result: bool = True,
           **ranges: Any) -> Any:
    """A trainer option: a dataclass field offered as `--FLAG` (default: the field name with dashes),
    with its help text and, if `ranges` are given (`at_least`, `at_most`, `choices`, `integer`), the
    range `check_options` enforces. A bool option is a flag that is off by default. result=False: the
    option does not change what the run computes (a path, a cadence), so it may differ when a run resumes
    (`result_settings`)."""
    declared = setting(default, **ranges).metadata if ranges else {}
    return dataclasses.field(default=default, metadata={**declared, "eej_option": {"help": help, "flag": flag},
                                                        **({} if result else {"eej_no_result": True})})


def result_settings(options: Any) -> dict[str, Any]:
    """The fields of the dataclass `options` that change what a run computes (all but those declared with
    result=False), by name: what a resumed run must agree with."""
    fields = dataclasses.fields(options)
    return {f.name: getattr(options, f.name) for f in fields if not f.metadata.get("eej_no_result")}


def option_fields(options: Any) -> list[dataclasses.Field]:
    """The fields of a dataclass (or instance) declared with `option`, in declaration order."""
    return [f for f in dataclasses.fields(options) if "eej_option" in f.metadata]


def flag_name(field: dataclasses.Field) -> str:
    """The command-line name of an option field, without the dashes (also its `--config FILE` key)."""
    return field.metadata["eej_option"]["flag"] or field.name.replace("_", "-")


def check_options(options: Any, owner: str) -> None:
    """TrainError naming `owner` and the field for the first option of `options` out of its declared range,
    or holding a float that is not finite (nan, inf)."""
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise TrainError(f"{owner} {field.name} must be a finite number, got {value}")
    try:
        check_settings(options, owner)
    except ValueError as e:
        raise TrainError(str(e)) from None


def parse_numbers(text: str, kind: type, name: str) -> list:
    """The comma-separated numbers of an option such as `teacher_depths="2,4,6"` (TrainError if malformed)."""
    try:
        return [kind(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise TrainError(f"{name} must be comma-separated numbers, got {text!r}") from None


# ----------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Trained:
    """What a trainer wrote: the artifact's path and its held-out report (empty without held-out data)."""

    artifact: str
    held_out: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TrainerSpec:
    """A registered trainer: its options dataclass and its training function."""

    name: str
    options: type
    train: Callable[..., Trained]


_TRAINERS: dict[str, TrainerSpec] = {}


def register_trainer(name: str, *, options: type, train: Callable[..., Trained]) -> TrainerSpec:
    """Make `eej train name` available (see the module docstring); returns its TrainerSpec."""
    spec = TrainerSpec(name, options, train)
    _TRAINERS[name] = spec
    return spec


def trainers() -> dict[str, TrainerSpec]:
    """Every registered trainer by name (importing TRAINER_MODULES registers them)."""
    for module in TRAINER_MODULES:
        importlib.import_module(module)
    return dict(_TRAINERS)


# ----------------------------------------------------------------------------- the artifact of a run


def reproduce_command(method: str, model: str, data: Any, out_dir: str, options: Any, run: Any) -> str:
    """The `eej train METHOD` command line that repeats a run: every option explicit (None: left to its default)."""
    parts = ["eej", "train", method, "--model", model, "--out", out_dir]
    for group in (data, run, options):
        for field in option_fields(group):
            value, flag = getattr(group, field.name), f"--{flag_name(field)}"
            if value is None or value is False:
                continue
            if value is True:
                parts.append(flag)
            else:
                parts += [flag, *map(str, value if isinstance(value, (tuple, list)) else [value])]
    return shlex.join(parts)


def save_trained(path: str, arrays: dict[str, Any], method: str, model: Model, data: Any, out_dir: str, options: Any,
                 run: Any, *, held_out: dict | None = None, record: dict | None = None, command_prefix: str | None = None,
                 **header: Any) -> Trained:
    """Write a trained artifact: `arrays`, the method's `header` fields (settings, schedule, ...), the
    reproduce line (after `command_prefix &&`, e.g. the command that made the data), the held-out
    report, and under `train` the run's main options plus `record`."""
    command = reproduce_command(method, model.name, data, out_dir, options, dataclasses.replace(run, restart=False))
    train = {"steps": run.steps, "stop_at": run.stop_at, "batch_size": run.batch_size, "seq_len": data.seq_len,
             "lr": run.learning_rate, "data": [os.path.basename(p) for p in data.files], **(record or {})}
    save_artifact(path, arrays, method, model.cfg, **header, held_out=held_out or {}, train=train,
                  reproduce=f"{command_prefix} && {command}" if command_prefix else command)
    return Trained(path, held_out or {})
