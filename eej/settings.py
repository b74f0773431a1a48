"""Method settings: declared fields with their ranges, and presets from config files.

A setting is a dataclass field declared with `setting(default, ...)`: its type and allowed range
live in the declaration, and `check_settings(obj)` enforces them with one-line errors. Strategies
(frozen dataclasses) check themselves on construction; the preset schemas of the method registry
(`eej.decoding.methods`) are checked the same way when a preset is read.

Each model x method has one YAML file, `configs/<model>/<method>.yaml`:

    default: 2x            # the preset `--method NAME` uses
    presets:
      2x: {warmup_layers: 2, min_layers: 12, ...}
      3x: {...}

`--method NAME:PRESET` picks a preset; `--method NAME:path/to/file.yaml` reads a file holding one
settings mapping (or a presets file, whose default is used). Relative paths inside settings (trained
artifacts under `artifacts/`) are resolved against the repository root. `EEJ_CONFIG_DIR` points
elsewhere for configs of your own.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence, Type, TypeVar

import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

T = TypeVar("T")


class PresetError(ValueError):
    """A config file or preset is missing or malformed."""


# ----------------------------------------------------------------------------- declared settings


def setting(
    default: Any = dataclasses.MISSING,
    *,
    at_least: float | None = None,
    at_most: float | None = None,
    choices: Sequence[Any] | None = None,
    integer: bool = False,
    kw_only: bool = False,
) -> Any:
    """A dataclass field whose value `check_settings` validates: a number in [at_least, at_most]
    (an integer if `integer`), or one of `choices`. kw_only: a keyword-only field (e.g. one a base class
    adds after its subclasses' positional fields)."""
    meta = {"at_least": at_least, "at_most": at_most, "choices": None if choices is None else tuple(choices), "integer": integer}
    return dataclasses.field(default=default, metadata={"eej_setting": meta}, kw_only=kw_only)


def check_settings(obj: Any, owner: str) -> None:
    """ValueError naming `owner` and the field for the first declared setting of `obj` out of its range."""
    for field in dataclasses.fields(obj):
        meta = field.metadata.get("eej_setting")
        if meta is None:
            continue
        value = getattr(obj, field.name)
        if meta["choices"] is not None:
            if value not in meta["choices"]:
                raise ValueError(f"{owner} {field.name} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
            continue
        lo, hi = meta["at_least"], meta["at_most"]
        integral = isinstance(value, int) and not isinstance(value, bool)
        ok = integral or (isinstance(value, float) and not meta["integer"])
        ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi)
        if not ok:
            kind = "an integer " if meta["integer"] else ""
            if lo is not None and hi is not None:
                bound = f"{kind}in [{lo:g}, {hi:g}]"
            else:
                bound = f"{kind}>= {lo:g}" if lo is not None else f"{kind}<= {hi:g}"
            raise ValueError(f"{owner} {field.name} must be {bound}, got {value!r}")


# ----------------------------------------------------------------------------- presets from config files


def config_dir() -> str:
    return os.environ.get("EEJ_CONFIG_DIR", os.path.join(REPO_ROOT, "configs"))


def resolve_path(path: str) -> str:
    """An absolute path; relative ones are taken from the repository root."""
    return path if os.path.isabs(path) else os.path.join(REPO_ROOT, path)


def _read_yaml(path: str) -> Any:
    if not os.path.isfile(path):
        raise PresetError(f"config file not found: {path}")
    with open(path) as f:
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise PresetError(f"{path}: not valid YAML ({e})") from None


def preset_file(model_name: str, method: str) -> str:
    """Where the presets of `method` for `model_name` live: configs/<model>/<method>.yaml."""
    return os.path.join(config_dir(), os.path.basename(model_name.rstrip(os.sep)), f"{method}.yaml")


def method_settings(model_name: str, method: str, spec: str | None) -> dict[str, Any]:
    """The settings mapping for `method` on `model_name` given the part after ':' (or None)."""
    if spec is not None and (spec.endswith((".yaml", ".yml", ".json")) or os.sep in spec):
        data, where = _read_yaml(spec), spec
    else:
        where = preset_file(model_name, method)
        if not os.path.isfile(where):
            raise PresetError(
                f"no {method} settings for model {model_name!r} (looked for {where}); pass "
                f"--method {method}:FILE.yaml with your own settings"
            )
        data = _read_yaml(where)
    if not isinstance(data, dict):
        raise PresetError(f"{where}: expected a mapping of settings")
    if "presets" not in data:
        if spec is not None and not spec.endswith((".yaml", ".yml", ".json")):
            raise PresetError(f"{where} has no presets; cannot pick {spec!r}")
        return data
    presets = data["presets"]
    name = data.get("default") if spec is None or spec.endswith((".yaml", ".yml", ".json")) else spec
    if name not in presets:
        raise PresetError(f"unknown {method} preset {name!r} in {where}; available: {', '.join(map(str, presets))}")
    return dict(presets[name])


def from_settings(cls: Type[T], settings: dict[str, Any], where: str = "settings") -> T:
    """Build the frozen dataclass `cls` from `settings`, naming any unknown key or bad value in the error."""
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise PresetError(f"{where}: unknown key(s) {', '.join(unknown)}; {cls.__name__} takes {', '.join(sorted(fields))}")
    # YAML lists become tuples so that the dataclass stays hashable (a static jit argument).
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    try:
        return cls(**settings)
    except (TypeError, ValueError) as e:
        raise PresetError(f"{where}: {e}") from None
