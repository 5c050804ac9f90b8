"""One config dataclass per program: defaults here, a YAML file on top, CLI flags on top of that.

`load_config` is shared by every program of the project (builder, trainer, ...): a field's
metadata gives its help text and CLI spelling, so the dataclass is the one place a setting is
declared and documented.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config file, key or value; its message is the one line the user sees."""


def option(default: Any, help: str, *, choices: tuple | None = None, flag: str | None = None) -> Any:
    """A dataclass field with the metadata `load_config` turns into a CLI flag."""
    meta = {"help": help, "choices": choices, "flag": flag}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp: Any) -> tuple[type, bool, bool]:
    """(element type, is_list, is_optional) of an annotation such as `list[str] | None`."""
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True, optional
    return tp, False, optional


def _coerce(name: str, value: Any, tp: Any) -> Any:
    base, is_list, optional = _base_type(tp)
    if value is None:
        if optional or is_list:
            return None if optional else []
        raise ConfigError(f"config key '{name}' must not be empty")
    if is_list:
        values = value if isinstance(value, list) else [value]
        return [_coerce(name, v, base) for v in values]
    if isinstance(value, str) and base is not str:  # from the command line, or quoted in YAML
        return _parse(name, value, base)
    if base is float and type(value) is int:
        return float(value)
    if type(value) is not base:  # bool is an int subclass: `type` keeps `true` out of int fields
        raise ConfigError(f"config key '{name}' must be {base.__name__}, got {value!r}")
    return value


def _parse(name: str, text: str, base: type) -> Any:
    try:
        if base is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        return base(text)
    except ValueError:
        raise ConfigError(f"config key '{name}' must be {base.__name__}, got {text!r}") from None


def _flag(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def build_parser(cls: type, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML file of settings (keys as below, with underscores); flags override it")
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        base, is_list, _ = _base_type(hints[field.name])
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        kwargs: dict[str, Any] = {"dest": field.name, "help": field.metadata.get("help", ""), "default": argparse.SUPPRESS}
        if field.metadata.get("choices"):
            kwargs["choices"] = field.metadata["choices"]
        if base is bool:
            parser.add_argument(_flag(field), action=argparse.BooleanOptionalAction, **kwargs)
        elif is_list:
            parser.add_argument(_flag(field), action="append", metavar=field.name.upper(), **kwargs)
        else:
            parser.add_argument(_flag(field), metavar=base.__name__.upper(), **kwargs)
        parser._actions[-1].help += f" (default: {default!r})"
    return parser


def load_config(cls: type[T], argv: list[str] | None, description: str) -> T:
    """Defaults, then `--config FILE.yaml`, then flags. Raises ConfigError with one clear line."""
    args = vars(build_parser(cls, description).parse_args(argv))
    values: dict[str, Any] = {}
    if path := args.pop("config", None):
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in loaded:
            if key not in known:
                raise ConfigError(f"unknown config key '{key}' in {path}")
        values.update(loaded)
    values.update(args)
    hints = typing.get_type_hints(cls)
    config = cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})
    if hasattr(config, "validate"):
        config.validate()
    return config
