"""The method registry: `--method NAME[:CONFIG]` -> (strategy, method_params) for a loaded model.

A method is defined by one registration, `register_method(name, settings=..., load=..., random=...)`:

- `settings`: the frozen dataclass its presets fill (`configs/<model>/<name>.yaml`, or a file given as
  CONFIG; see eej.settings); its fields' ranges are declared with `eej.settings.setting`. Without a
  preset file for the model, a schema whose every field has a default runs with the defaults. None:
  the method takes no settings (and refuses a CONFIG).
- `load(model, settings) -> (strategy, method_params)`: builds the strategy and loads its trained
  add-ons (a missing or mismatched add-on is an error, never random weights).
- `random(model, seed) -> (strategy, method_params)`: the method with random, untrained add-ons for
  any model (tiny test models included) — what the generic tests (batching, sharding, losslessness)
  run every registered method with.

Presets, their validation and the errors they raise come from here; `build_method` also checks that
the add-ons fit the model (`Strategy.validate`).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable

from eej.decoding.plain import Plain
from eej.decoding.strategy import Strategy
from eej.settings import from_settings, method_settings, preset_file
from eej.weights.registry import Model

Loader = Callable[[Model, Any], tuple[Strategy, Any]]
RandomBuilder = Callable[[Model, int], tuple[Strategy, Any]]


class MethodError(ValueError):
    """Unknown method or settings that don't fit."""


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A registered method (see the module docstring)."""

    name: str
    load: Loader
    random: RandomBuilder
    settings: type | None = None


_METHODS: dict[str, MethodSpec] = {}

# Modules that register methods on import (plugins: imported on first use of the registry).
METHOD_MODULES = ("eej.decoding.kangaroo", "eej.decoding.skipdecode", "eej.decoding.specee", "eej.decoding.m2r2")


def register_method(name: str, *, load: Loader, random: RandomBuilder, settings: type | None = None) -> MethodSpec:
    """Register `--method name` (see the module docstring); returns its MethodSpec."""
    spec = MethodSpec(name, load, random, settings)
    _METHODS[name] = spec
    return spec


def _load_methods() -> None:
    for module in METHOD_MODULES:
        importlib.import_module(module)


def known_methods() -> tuple[str, ...]:
    _load_methods()
    return tuple(_METHODS)


def method_spec(name: str) -> MethodSpec:
    """The registration of method `name`; MethodError naming the known ones if there is none."""
    _load_methods()
    if name not in _METHODS:
        raise MethodError(f"unknown method {name!r}; available: {', '.join(_METHODS)}")
    return _METHODS[name]


def parse_method(spec: str) -> tuple[str, str | None]:
    """"name" or "name:config" -> (name, config or None)."""
    name, sep, config = spec.partition(":")
    name = name.strip()
    if not name:
        raise MethodError(f"empty method name in {spec!r}")
    return name, (config.strip() or None) if sep else None


def method_settings_for(model: Model, name: str, config: str | None) -> Any:
    """The settings dataclass of method `name` for `model` from its preset or settings file `config`."""
    spec = method_spec(name)
    if spec.settings is None:
        if config is not None:
            raise MethodError(f"method {name!r} takes no config (got {config!r})")
        return None
    if config is None and not os.path.isfile(preset_file(model.name, name)) and _all_defaults(spec.settings):
        return spec.settings()  # nothing to configure: the declared defaults
    return from_settings(spec.settings, method_settings(model.name, name, config), f"{name} settings")


def _all_defaults(cls: type) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(cls))


def build_method(model: Model, spec: str) -> tuple[Strategy, Any]:
    """Resolve a method spec `NAME[:PRESET|:FILE]` for `model` -> (strategy, method_params)."""
    name, config = parse_method(spec)
    strategy, method_params = method_spec(name).load(model, method_settings_for(model, name, config))
    strategy.validate(model.cfg, method_params)
    return strategy, method_params


def random_method(model: Model, name: str, seed: int = 0) -> tuple[Strategy, Any]:
    """A registered method with random add-ons for `model` (see `register_method`)."""
    strategy, method_params = method_spec(name).random(model, seed)
    strategy.validate(model.cfg, method_params)
    return strategy, method_params


register_method("plain", load=lambda model, settings: (Plain(), None), random=lambda model, seed: (Plain(), None))
