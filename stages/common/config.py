"""Typed configuration: the strict pydantic base, YAML loading and `--set a.b=c` overrides.

Every user-facing config error becomes a `ConfigError` whose message names the problem: the field
path (`rl.max_turns`), the YAML file and line, or the override that could not be applied.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors (a misspelt key must never be ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class StageConfig(StrictModel):
    """Fields every stage config has."""

    experiment: str = "ufo"
    """MLflow experiment the stage's run is logged to (the pipeline copies its own here)."""
    seed: int = 0
    """Seeds everything random in the stage: same seed and inputs, same result on the same machine."""


class ConfigError(ValueError):
    """A config could not be loaded or validated; the message names the field, file or override."""


_FIELD_PREFIX = re.compile(r"^([a-z_][a-z0-9_.]*): ")


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line per problem, each starting with the dotted field path."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p != "__root__")
        msg = e["msg"].removeprefix("Value error, ")
        # Cross-field validators name their field first ("max_turns: ..."): extend the path with it.
        if m := _FIELD_PREFIX.match(msg):
            loc = ".".join(p for p in (loc, m.group(1)) if p)
            msg = msg[m.end():]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (misspelt?); " + msg
        path = ".".join(p for p in (prefix, loc) if p) or "(config)"
        lines.append(f"{path}: {msg}")
    return "\n".join(lines)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a syntax error names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {err.problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides in order; values are parsed as YAML (`3` is an int, `[1,2]` a list)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. rl.max_turns=5")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a mapping")
            node = child
        node[parts[-1]] = value
    return data


def validate(model: type[M], data: dict[str, Any], source: str = "") -> M:
    """Validate a dict into `model`, turning pydantic's error into a ConfigError with field paths."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        head = f"{source}: invalid config\n" if source else "invalid config\n"
        raise ConfigError(head + format_validation_error(err)) from None


def load_config(model: type[M], path: str | Path, overrides: list[str] | None = None) -> M:
    """YAML file + overrides -> validated model. The one way configs enter the program."""
    data = apply_overrides(read_yaml(path), list(overrides or []))
    return validate(model, data, str(path))


def dump_yaml(model: BaseModel) -> str:
    """The resolved config as YAML, as logged to MLflow and printed by `ufo config validate`."""
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False)
