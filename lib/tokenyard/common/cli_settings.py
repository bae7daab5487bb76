"""Command-line flags derived from a settings class, so that no knob is declared twice.

Every field becomes ``--field-name``; a field that is itself a pydantic model becomes a group of
``--group-field`` flags. Help text names the env var and the default. Values given on the command
line are passed to the settings class as init arguments, which pydantic-settings ranks above
environment variables, so the precedence is: flag > env var > default.

Bad input ends the process with one line that names the flag and its env var, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, NoReturn, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)


class SettingsError(Exception):
    """A configuration problem, already phrased for the operator (one line)."""


@dataclass(frozen=True)
class FlagSpec:
    path: tuple[str, ...]  # field names from the root model down to the leaf
    flag: str
    env: str
    field: FieldInfo


def _unwrap_optional(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    ann = _unwrap_optional(annotation)
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def flag_specs(cls: type[BaseSettings]) -> list[FlagSpec]:
    prefix = str(cls.model_config.get("env_prefix", ""))
    delim = str(cls.model_config.get("env_nested_delimiter") or "__")
    specs: list[FlagSpec] = []
    for name, field in cls.model_fields.items():
        if _is_model(field.annotation):
            sub: type[BaseModel] = _unwrap_optional(field.annotation)
            for sub_name, sub_field in sub.model_fields.items():
                specs.append(
                    FlagSpec(
                        path=(name, sub_name),
                        flag="--" + f"{name}-{sub_name}".replace("_", "-"),
                        env=f"{prefix}{name}{delim}{sub_name}".upper(),
                        field=sub_field,
                    )
                )
        else:
            specs.append(
                FlagSpec(
                    path=(name,),
                    flag="--" + name.replace("_", "-"),
                    env=f"{prefix}{name}".upper(),
                    field=field,
                )
            )
    return specs


def _default_text(field: FieldInfo) -> str:
    if field.default is not PydanticUndefined:
        value = field.default
    elif field.default_factory is not None:
        try:
            value = field.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return "computed"
    else:
        return "required"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None or value == "":
        return "unset"
    return str(value)


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints the usage block on errors; operators get one line naming the culprit."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            bad = message.split(":", 1)[1].strip()
            message = f"unknown flag {bad} (see --help)"
        self.exit(2, f"{self.prog}: error: {message}\n")


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return _OneLineParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_settings_flags(parser: argparse.ArgumentParser, cls: type[BaseSettings]) -> None:
    """Add one flag per settings field; defaults are suppressed so that env vars still apply."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for spec in flag_specs(cls):
        target: argparse.ArgumentParser | argparse._ArgumentGroup = parser
        if len(spec.path) > 1:
            target = groups.setdefault(spec.path[0], parser.add_argument_group(f"{spec.path[0]} settings"))
        desc = spec.field.description or ""
        help_text = f"{desc} [env {spec.env}; default {_default_text(spec.field)}]".replace("%", "%%")
        ann = _unwrap_optional(spec.field.annotation)
        dest = "__".join(spec.path)
        if ann is bool:
            target.add_argument(
                spec.flag,
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
            continue
        choices: list[str] | None = None
        metavar = "VALUE"
        if isinstance(ann, type) and issubclass(ann, Enum):
            choices = [str(m.value) for m in ann]
            metavar = "{" + ",".join(choices) + "}"
        elif typing.get_origin(ann) is typing.Literal:
            choices = [str(a) for a in typing.get_args(ann)]
            metavar = "{" + ",".join(choices) + "}"
        elif ann is int:
            metavar = "INT"
        elif ann is float:
            metavar = "FLOAT"
        # Values stay strings here; pydantic validates them with the same rules as env vars.
        target.add_argument(spec.flag, dest=dest, default=argparse.SUPPRESS, metavar=metavar, help=help_text)


def _nest(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dest, value in values.items():
        parts = dest.split("__")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def build_settings(cls: type[S], namespace: argparse.Namespace) -> S:
    """Build settings from parsed flags (and the environment); raises SettingsError with one line."""
    specs = {spec.path: spec for spec in flag_specs(cls)}
    explicit = {k: v for k, v in vars(namespace).items() if "__" in k or k in cls.model_fields}
    explicit = {k: v for k, v in explicit.items() if tuple(k.split("__")) in specs}
    try:
        return cls(**_nest(explicit))
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(cls, exc, explicit_dests=set(explicit))) from None


def describe_validation_error(
    cls: type[BaseSettings], exc: ValidationError, explicit_dests: set[str] | None = None
) -> str:
    specs = {spec.path: spec for spec in flag_specs(cls)}
    problems = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        spec = specs.get(loc[:2]) or specs.get(loc[:1])
        msg = str(err["msg"])
        if spec is None:
            where = ".".join(loc) or "settings"
            problems.append(f"{where}: {msg}")
            continue
        given = err.get("input")
        source = "flag" if explicit_dests and "__".join(spec.path) in explicit_dests else "setting"
        shown = f" (got {given!r})" if isinstance(given, str | int | float) else ""
        problems.append(f"invalid {source} {spec.flag} / {spec.env}{shown}: {msg}")
    return "; ".join(problems)


def parse_settings(
    cls: type[S], argv: Sequence[str] | None, prog: str, description: str
) -> tuple[S, argparse.Namespace]:
    parser = new_parser(prog, description)
    add_settings_flags(parser, cls)
    namespace = parser.parse_args(argv)
    try:
        return build_settings(cls, namespace), namespace
    except SettingsError as exc:
        fail(prog, str(exc))


def fail(prog: str, message: str, code: int = 2) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(code)
