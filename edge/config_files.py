"""Device config files: YAML read strictly, validated by pydantic, every problem reported.

Shared by the firmware profiles (``edge.profiles``) and the device config (``edge.config``):
duplicate YAML keys are errors (plain PyYAML keeps the last one silently), every section
forbids unknown keys (a typo fails at boot with a did-you-mean), and ``ConfigError`` carries
every problem as ``file: field: message``.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


@dataclass(frozen=True)
class Issue:
    """One problem in one file: the dotted field path ('' for the whole file) and why."""

    source: Path | None
    field: str
    message: str

    def __str__(self) -> str:
        where = [str(self.source)] if self.source else []
        where += [self.field] if self.field else []
        return ": ".join([*where, self.message])


class ConfigError(ValueError):
    """A profile or device config that cannot be loaded; ``issues`` lists every problem."""

    def __init__(self, issues: Sequence[Issue]) -> None:
        if not issues:
            raise ValueError("ConfigError needs at least one issue")
        self.issues = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))

    @classmethod
    def single(cls, source: Path | None, field: str, message: str) -> ConfigError:
        return cls([Issue(source, field, message)])


class StrictModel(BaseModel):
    """Base of every config section: immutable, and unknown keys are errors (typos fail)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (plain PyYAML silently keeps the last one)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Parse ``path`` as a YAML mapping (safe loader, no duplicate keys) or raise ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError.single(path, "", f"cannot read: {err}") from err
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError.single(path, "", f"invalid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError.single(path, "", f"expected a mapping, got {type(data).__name__}")
    return data


_Model = typing.TypeVar("_Model", bound=BaseModel)


def validate_model(
    model: type[_Model], data: Any, source: Path | None, context: dict[str, Any] | None = None,
) -> _Model:
    """``model.model_validate(data)`` with pydantic's errors turned into a ``ConfigError``."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as err:
        raise ConfigError(validation_issues(err, model, source)) from err


def validation_issues(
    err: ValidationError, model: type[BaseModel], source: Path | None,
) -> list[Issue]:
    """One ``Issue`` per pydantic error; unknown keys get a did-you-mean from the real fields."""
    issues = []
    for error in err.errors():
        loc = tuple(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            fields = _fields_at(model, loc[:-1])
            hint = did_you_mean(str(loc[-1]), fields)
            message = f"unknown field{hint}" if hint else f"unknown field; known: {fields}"
        elif error["type"] == "missing":
            message = "required field is missing"
        elif _echoable(error):
            message += f", got {error['input']!r}"
        issues.append(Issue(source, ".".join(str(part) for part in loc), message))
    return issues


def _echoable(error: Any) -> bool:
    """Add the bad input to pydantic's message? Short scalars only, and never a password."""
    value, loc = error["input"], error["loc"]
    return (error["type"] != "value_error" and "password" not in loc
            and isinstance(value, (str, int, float)) and len(str(value)) <= 80)


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: type[BaseModel] = model
    for part in loc:
        info = current.model_fields.get(str(part))
        if info is None:
            return []
        nested = [t for t in (info.annotation, *typing.get_args(info.annotation))
                  if isinstance(t, type) and issubclass(t, BaseModel)]
        if not nested:
            return []
        current = nested[0]
    return list(current.model_fields)


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    """`` (did you mean 'X'?)`` for the closest of ``choices`` (or a case match), else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in choices}
        close = [lowered[word.lower()]] if word.lower() in lowered else []
    return f" (did you mean {close[0]!r}?)" if close else ""
