"""Configs are dataclasses; every field is a command-line option with its help text."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any

__all__ = ["option", "check_fields", "json_object", "add_options", "from_args"]


def option(default: Any, help: str) -> Any:
    """A config field with its command-line help (``default`` may be a factory such as ``dict``)."""
    if callable(default) and isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def check_fields(config: Any, checks: dict[str, tuple[bool, str]]) -> None:
    """``checks`` maps a field name to (its value is acceptable, the accepted range); the first failure raises
    ``ValueError`` naming the field, its value and the range."""
    for name, (ok, accepted) in checks.items():
        if not ok:
            raise ValueError(f"Invalid {name} value: {getattr(config, name)!r} ({accepted})")


def json_object(text: str) -> dict[str, Any]:
    """A command-line JSON object (``'{"lr": 1e-3}'``); anything else is a usage error saying so."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({error.msg}); expected an object such as "
                                         "'{\"key\": 1}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is a JSON {type(value).__name__}; expected an object such as "
                                         "'{\"key\": 1}'")
    return value


def add_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One ``--option`` per dataclass field, typed from its annotation, defaulting to the field's default."""
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        if spec.name in skip:
            continue
        flag = "--" + spec.name.replace("_", "-")
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        kind = hints[spec.name]
        help_text = spec.metadata.get("help", "") + (f" (default: {default})" if default not in (None, {}) else "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=spec.metadata.get("help"))
            continue
        if typing.get_origin(kind) is dict:
            convert: Any = json_object
        else:
            options = [t for t in typing.get_args(kind) if t is not type(None)] or [kind]
            convert = options[0]
        parser.add_argument(flag, type=convert, default=default, metavar=spec.name.upper(), help=help_text)


def from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of ``cls`` from the parsed options that name its fields, with ``overrides`` on top."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names}, **overrides)
