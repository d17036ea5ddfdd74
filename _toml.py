"""Reading the TOML recipes behind `--config`, with errors users can act on."""

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path

from .errors import RadioDistillError


def read_toml(path: str | Path | None) -> dict:
    """The file's table, or {} when no file is given."""
    if path is None:
        return {}
    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise RadioDistillError(f"config '{path}': {e}") from None


def field_types(cls) -> dict:
    """{field name: type} of a dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def typed(table: dict, types_: dict, *, path: str | Path | None, prefix: str = "") -> dict:
    """`table`'s values of the keys in `types_`, checked against those types and made what the config
    wants (a TOML string for a Path, an array for a tuple, an integer for a float); others left out.

    A wrong type is one line naming the key and the file: a TOML `overwrite = "false"` would be truthy.

    Args:
        types_: {key: type}, e.g. `field_types(SomeConfig)`: bool, int, float, str, Path, tuple[X, ...],
            dict (dict[str, X]), a dataclass (a table of its fields), unions of those and None.
        prefix: prepended to the keys named in errors, for tables inside the file ('loss.').
    """
    out = {}
    for key, kind in types_.items():
        if key in table:
            try:
                out[key] = _as(table[key], kind, f"{prefix}{key}.", path)
            except TypeError:
                got = json.dumps(table[key], default=str)
                raise RadioDistillError(f"config '{path}': '{prefix}{key}' must be {_wanted(kind)}, got {got}") from None
    return out


def _as(value, kind, prefix: str, path):
    """`value` as a field of type `kind` holds it; TypeError when it is of another type."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _as(value, option, prefix, path)
            except TypeError:
                pass
    elif dataclasses.is_dataclass(kind) and isinstance(value, dict):
        return {**value, **typed(value, field_types(kind), path=path, prefix=prefix)}  # unknown keys: the caller's
    elif (origin or kind) is dict and isinstance(value, dict):
        return {k: _as(v, args[1], prefix, path) for k, v in value.items()} if args else value
    elif (origin or kind) is tuple and isinstance(value, (list, tuple)):
        return tuple(_as(v, args[0], prefix, path) for v in value) if args else tuple(value)
    elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif kind is Path and isinstance(value, (str, Path)):
        return Path(value)
    elif kind in (bool, str, type(None)) and type(value) is kind:
        return value
    elif kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TypeError(kind)


def _wanted(kind) -> str:
    """'true or false', 'a whole number or an array of whole numbers'... for a type."""
    origin, args = typing.get_origin(kind) or kind, typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_wanted(a) for a in args if a is not type(None) and not (a is Path and str in args))
    if origin is tuple:
        return f"an array of {_plural(args[0])}" if args else "an array"
    if origin is dict:
        return f"a table of {_plural(args[1])}" if args else "a table"
    if dataclasses.is_dataclass(kind):
        return "a table"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
            Path: "a path (a string)"}[kind]


def _plural(kind) -> str:
    return " or ".join(w.split(" ", 1)[1] + "s" for w in _wanted(kind).split(" or "))
