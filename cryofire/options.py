"""Command-line options generated from configuration dataclasses, so every option is defined once.

Each field of a dataclass becomes `--field-name`, with its type, its default, and the help text of its entry in
the class docstring's ``Attributes:`` section (where the unit is stated).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any

_SCALARS = {"int": int, "float": float, "str": str}


def attribute_docs(cls: type) -> dict[str, str]:
    """The ``Attributes:`` entries of a class docstring, name -> one-line text."""
    docs, current = {}, None
    section = (cls.__doc__ or "").split("Attributes:", 1)[-1]
    for line in section.splitlines():
        match = re.match(r"\s{4,8}(\w+): (.*)", line)
        if match:
            current = match.group(1)
            docs[current] = match.group(2).strip()
        elif current and line.strip():
            docs[current] += " " + line.strip()
    return docs


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one option per field of dataclass `cls` (except `skip`)."""
    docs = attribute_docs(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        default = field.default if field.default is not dataclasses.MISSING else None
        option = "--" + field.name.replace("_", "-")
        help_text = f"{docs.get(field.name, '')} (default: {default})".replace("%", "%%")
        type_name = str(field.type).replace(" | None", "")
        if type_name == "bool":
            parser.add_argument(option, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif type_name in _SCALARS:
            parser.add_argument(option, type=_SCALARS[type_name], default=None, help=help_text)


def dataclass_values(args: argparse.Namespace, cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of `cls` the user set on the command line (None means 'not given')."""
    values = {}
    for field in dataclasses.fields(cls):
        value = getattr(args, field.name, None)
        if field.name not in skip and value is not None:
            values[field.name] = value
    return values
