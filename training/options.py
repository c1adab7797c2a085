"""Command-line options built from a settings dataclass, so each option is written once.

A field becomes an option when it is declared with :func:`option` (its help
text, and optionally choices, a flag name or a parser); its default, type and
whether it repeats come from the dataclass itself. Fields declared without it
(e.g. verbosity) stay out of the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

S = TypeVar("S")
REQUIRED = dataclasses.MISSING


def option(
    default: Any = REQUIRED,
    help: str = "",
    *,
    choices: Sequence[str] | None = None,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    shown: str | None = None,
    metavar: str | None = None,
) -> Any:
    """A dataclass field that is also a CLI option.

    `parse` turns the command-line text into the field's value (choices are
    checked on the text); `shown` is the default as the help text shows it.
    """
    metadata = {"help": help, "choices": choices, "flag": flag, "parse": parse, "shown": shown, "metavar": metavar}
    if default is REQUIRED:
        return dataclasses.field(metadata={"cli": metadata})
    if isinstance(default, list | dict | set):
        raise TypeError("mutable defaults are not options")
    return dataclasses.field(default=default, metadata={"cli": metadata})


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(element type, repeatable) of `X`, `X | None` or `list[X] | None`."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def add_options(parser: argparse.ArgumentParser, settings_class: type) -> None:
    """One `--field-name` option per field declared with :func:`option`, in declaration order."""
    hints = typing.get_type_hints(settings_class)
    for field in dataclasses.fields(settings_class):
        cli = field.metadata.get("cli")
        if cli is None:
            continue
        element, repeatable = _base_type(hints[field.name])
        flag = cli["flag"] or "--" + field.name.replace("_", "-")
        required = field.default is REQUIRED
        shown = cli["shown"] if cli["shown"] is not None else field.default
        help_text = cli["help"] if required or shown is None else f"{cli['help']} (default: {shown})"
        parse = cli["parse"] or (Path if element is Path else element)
        kwargs: dict[str, Any] = {"dest": field.name, "help": help_text, "metavar": cli["metavar"]}
        if cli["choices"]:
            kwargs["choices"] = list(cli["choices"])
        else:
            kwargs["type"] = parse
        if repeatable:
            kwargs["action"] = "append"
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = argparse.SUPPRESS  # absent: the dataclass's own default applies
        parser.add_argument(flag, **kwargs)


def settings_from_args(settings_class: type[S], args: argparse.Namespace, **overrides: Any) -> S:
    """The settings the parsed options (and `overrides`) describe; every other field keeps its default."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(settings_class):
        cli = field.metadata.get("cli")
        if cli is None or not hasattr(args, field.name):
            continue
        value = getattr(args, field.name)
        if cli["choices"] and cli["parse"]:  # choices are checked as text, then parsed
            value = cli["parse"](value)
        values[field.name] = value
    return settings_class(**{**values, **overrides})
