"""The method registry: `--method NAME[:CONFIG]` -> (strategy, method_params) for a loaded model.

Each decoding method registers a builder here (its module is listed in METHOD_MODULES). CONFIG is
a preset name or a settings file (see eej.presets); methods without settings reject it.
"""

from __future__ import annotations

from typing import Any, Callable

from eej.decoding.plain import Plain
from eej.decoding.strategy import Strategy
from eej.weights.registry import Model

Builder = Callable[[Model, "str | None"], tuple[Strategy, Any]]
RandomBuilder = Callable[[Model, int], tuple[Strategy, Any]]
_BUILDERS: dict[str, Builder] = {}
_RANDOM: dict[str, RandomBuilder] = {}


class MethodError(ValueError):
    """Unknown method or settings that don't fit."""


def register_method(name: str, builder: Builder, random_instance: RandomBuilder | None = None) -> None:
    """Register `--method name`.

    builder(model, config) -> (strategy, method_params) for real use (trained add-ons, presets).
    random_instance(model, seed) -> (strategy, method_params) with random, untrained add-ons, for
    any model (tiny test models included): what generic tests (batching, sharding, losslessness)
    run every registered method with.
    """
    _BUILDERS[name] = builder
    if random_instance is not None:
        _RANDOM[name] = random_instance


# Modules that register methods on import; a module not (yet) present is skipped.
METHOD_MODULES = ("eej.decoding.kangaroo", "eej.decoding.skipdecode", "eej.decoding.specee", "eej.decoding.m2r2")


def _load_methods() -> None:
    import importlib

    for module in METHOD_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def known_methods() -> tuple[str, ...]:
    _load_methods()
    return tuple(_BUILDERS)


def parse_method(spec: str) -> tuple[str, str | None]:
    """"name" or "name:config" -> (name, config or None)."""
    name, sep, config = spec.partition(":")
    name = name.strip()
    if not name:
        raise MethodError(f"empty method name in {spec!r}")
    return name, (config.strip() or None) if sep else None


def build_method(model: Model, spec: str) -> tuple[Strategy, Any]:
    """Resolve a method spec for `model` -> (strategy, method_params)."""
    name, config = parse_method(spec)
    _load_methods()
    if name not in _BUILDERS:
        raise MethodError(f"unknown method {name!r}; available: {', '.join(known_methods())}")
    strategy, method_params = _BUILDERS[name](model, config)
    strategy.validate(model.cfg, method_params)
    return strategy, method_params


def random_method(model: Model, name: str, seed: int = 0) -> tuple[Strategy, Any]:
    """A registered method with random add-ons for `model` (see `register_method`)."""
    _load_methods()
    if name not in _RANDOM:
        raise MethodError(f"method {name!r} has no random test instance")
    strategy, method_params = _RANDOM[name](model, seed)
    strategy.validate(model.cfg, method_params)
    return strategy, method_params


def methods_with_random_instances() -> tuple[str, ...]:
    _load_methods()
    return tuple(_RANDOM)


def _build_plain(model: Model, config: str | None) -> tuple[Strategy, Any]:
    if config is not None:
        raise MethodError(f"method 'plain' takes no config (got {config!r})")
    return Plain(), None


register_method("plain", _build_plain, lambda model, seed: (Plain(), None))
