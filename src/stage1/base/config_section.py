"""A config section: a dataclass that checks its own values when it is made, types first, then ranges.

Every config of the package is one (the model's `VQRAEConfig` and its sections, the loss, training's sections),
so each value is checked once, where it lives, whichever way it arrives: the command line through hydra, a YAML
preset, a `config.json` from someone else, or Python keywords. A bad value is one `ConfigError` (a ValueError)
naming the key, the value and what was expected:

    train.steps must be an integer, got 'abc' (str)

Types come from the annotations: bool, int, float (an int is taken as a float), str, `X | None`, tuples and
lists of one element type, dict, and nested sections (given as sections or as mappings). A `choice(...)` field
names its allowed strings. A section's `check()` holds what types cannot say: ranges, and relations between its
fields.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import MISSING, field, fields


class ConfigError(ValueError):
    """One bad config value."""


def choice(*options: str, default: str | None = None):
    """A string field that must be one of `options`; the default is the first unless given."""
    return field(default=options[0] if default is None else default, metadata={"choices": options})


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", dict: "a mapping"}


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) if a is not type(None) else "null" for a in args)
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} {_plural(args[0])}"
        return f"a list of {_plural(args[0])}"
    if isinstance(hint, type) and issubclass(hint, ConfigSection):
        return f"a mapping of {hint.section or hint.__name__} keys"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _plural(hint) -> str:
    return {bool: "booleans", int: "integers", float: "finite numbers", str: "strings", dict: "mappings"}.get(
        hint, _describe(hint))


class _Mismatch(Exception):
    pass


def _convert(value, hint):
    """value as `hint` (ints become floats where floats are expected, lists tuples), or _Mismatch."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        element = args[0] if args else typing.Any
        if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
            raise _Mismatch
        return origin(_convert(v, element) for v in value)
    if hint is typing.Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise _Mismatch
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Mismatch
        return value
    if hint is float:  # finite: an Inf passes every `> 0` check (an Inf eps painted flat grey, an Inf lr NaN weights)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Mismatch
        try:
            number = float(value)  # an int past float's range (10**400, from a JSON file) is OverflowError
        except OverflowError:
            raise _Mismatch from None
        if not math.isfinite(number):
            raise _Mismatch
        return number
    if hint is dict or origin is dict:
        if not isinstance(value, typing.Mapping):
            raise _Mismatch
        return dict(value)
    if isinstance(hint, type) and issubclass(hint, ConfigSection):
        if isinstance(value, hint):
            return value
        if not isinstance(value, typing.Mapping):
            raise _Mismatch
        return hint.from_dict(dict(value))
    if not isinstance(value, hint):
        raise _Mismatch
    return value


def _shown(value) -> str:
    return f"{value!r} ({type(value).__name__})"


class ConfigSection:
    """Base of the config dataclasses. `section` is the section's key in the config tree ("train", "quantizer";
    "" for the top level), so that messages name keys as the command line spells them."""

    section = ""

    def __post_init__(self):
        hints = _hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            try:
                value = _convert(value, hints[f.name])
            except _Mismatch:
                raise ConfigError(f"{self.key(f.name)} must be {self.expected(f.name)}, got {_shown(value)}") \
                    from None
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ConfigError(f"{self.key(f.name)} must be one of {list(choices)}, got {value!r}")
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Ranges and relations between fields, once the types hold (`require` for each)."""

    def expected(self, name: str) -> str:
        """What field `name` must be, said by its type error. A section may say more than the type can (the options
        a mapping takes); the fields before `name` are already checked when it is asked."""
        return _describe(_hints(type(self))[name])

    def key(self, name: str) -> str:
        return f"{self.section}.{name}" if self.section else name

    def require(self, condition: bool, name: str, expected: str) -> None:
        """ConfigError naming `name`'s value unless `condition`."""
        if not condition:
            raise ConfigError(f"{self.key(name)} must be {expected}, got {getattr(self, name)!r}")

    def require_positive(self, *names: str) -> None:
        for name in names:
            self.require(getattr(self, name) > 0, name, "> 0")

    def require_at_most(self, limit: int, *names: str) -> None:
        """Positive and at most `limit` (a stated bound: these are sizes something is allocated from)."""
        for name in names:
            self.require(0 < getattr(self, name) <= limit, name, f"from 1 to {limit:,}")

    def to_dict(self) -> dict:
        """Plain values (tuples as lists, sections as mappings): what JSON and YAML hold."""
        return dataclasses.asdict(self, dict_factory=lambda items: {k: list(v) if isinstance(v, tuple) else v
                                                                    for k, v in items})

    @classmethod
    def default_tree(cls) -> dict:
        """Every field with its default as to_dict() would give it, '???' (hydra's missing value) where a field
        has none; a nested section without a default gives its own tree."""
        hints, tree = _hints(cls), {}
        for f in fields(cls):
            if f.default is not MISSING:
                value = f.default
            elif f.default_factory is not MISSING:
                value = f.default_factory()
            elif isinstance(hints[f.name], type) and issubclass(hints[f.name], ConfigSection):
                value = hints[f.name].default_tree()
            else:
                value = "???"
            tree[f.name] = value.to_dict() if isinstance(value, ConfigSection) else (
                list(value) if isinstance(value, tuple) else value)
        return tree

    @classmethod
    def from_dict(cls, values):
        """From a mapping of field names (nested sections as mappings); unknown keys and missing required ones
        are refused, every value checked."""
        where = cls.section or "the config"
        if not isinstance(values, typing.Mapping):
            raise ConfigError(f"{where} must be a mapping, got {_shown(values)}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known), key=str)
        if unknown:
            raise ConfigError(f"unknown {cls.section + ' ' if cls.section else ''}config keys {unknown}; expected "
                              f"some of {known}")
        missing = [f.name for f in fields(cls)
                   if f.default is MISSING and f.default_factory is MISSING and f.name not in values]
        if missing:
            raise ConfigError(f"{where} config lacks keys {missing}")
        return cls(**values)
