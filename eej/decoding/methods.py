"""The method registry: `--method NAME[:CONFIG]` -> (strategy, method_params) for a loaded model.

Each decoding method registers a builder here. CONFIG is a preset name the method defines or a
path to a config file; methods without settings reject it.
"""

from __future__ import annotations

from typing import Any, Callable

from eej.decoding.plain import Plain
from eej.decoding.strategy import Strategy
from eej.weights.registry import Model

Builder = Callable[[Model, "str | None"], tuple[Strategy, Any]]
_BUILDERS: dict[str, Builder] = {}


class MethodError(ValueError):
    """Unknown method or settings that don't fit."""


def register_method(name: str, builder: Builder) -> None:
    _BUILDERS[name] = builder


def known_methods() -> tuple[str, ...]:
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
    if name not in _BUILDERS:
        raise MethodError(f"unknown method {name!r}; available: {', '.join(known_methods())}")
    strategy, method_params = _BUILDERS[name](model, config)
    strategy.validate(model.cfg, method_params)
    return strategy, method_params


def _build_plain(model: Model, config: str | None) -> tuple[Strategy, Any]:
    if config is not None:
        raise MethodError(f"method 'plain' takes no config (got {config!r})")
    return Plain(), None


register_method("plain", _build_plain)
