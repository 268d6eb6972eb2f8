"""``--policy-file``: where early exit is allowed, as an operator writes it (YAML).

Two sections, both optional::

    tasks:              # task class (request "task" field or X-Octomil-Task header) -> preset
      chat: balanced
      code: quality
      json: off         # full depth
      summary: {threshold: 0.2, min_layers: 0.6}
    never_exit:         # tokens that are never emitted from an early exit
      digits: true              # any token containing a digit
      code_identifiers: true    # snake_case / camelCase / dotted.name pieces
      json_keys: true           # tokens that open a quoted string: the first token of a JSON key
      strings: [" TODO", "null"]

The file is checked at startup; an error names the file and the line (``PolicyFileError``, a
``ConfigError``, so ``octomil serve`` ends with one ``error:`` line).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from octomil.config import ConfigError, EarlyExitSettings, resolve_early_exit

OFF = ("off", "none", "full")
TOKEN_CLASSES = ("digits", "code_identifiers", "json_keys")


class PolicyFileError(ConfigError):
    """The policy file is unreadable or invalid; the message names the file and line."""


@dataclass(frozen=True)
class NeverExit:
    """Token classes that always go to full depth (see :mod:`octomil.engine.token_classes`)."""

    digits: bool = False
    code_identifiers: bool = False
    json_keys: bool = False
    strings: tuple[str, ...] = ()

    @property
    def any(self) -> bool:
        return self.digits or self.code_identifiers or self.json_keys or bool(self.strings)


@dataclass(frozen=True)
class PolicyFile:
    tasks: dict[str, EarlyExitSettings] = field(default_factory=dict)
    never_exit: NeverExit = NeverExit()


def load_policy_file(path: str | Path) -> PolicyFile:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyFileError(f"--policy-file {path}: {exc.strerror or exc}") from None
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyFileError(f"--policy-file {path}{where}: invalid YAML: {problem}") from None
    return parse(root, str(path))


def parse(root: yaml.Node | None, name: str) -> PolicyFile:
    def fail(node: yaml.Node, message: str) -> PolicyFileError:
        return PolicyFileError(f"--policy-file {name}, line {node.start_mark.line + 1}: {message}")

    if root is None:
        return PolicyFile()
    sections = _mapping(root, "the file", fail)
    tasks: dict[str, EarlyExitSettings] = {}
    never = NeverExit()
    for key, value in sections:
        if key.value == "tasks":
            for task, preset in _mapping(value, "tasks", fail):
                tasks[task.value] = _settings(preset, task.value, fail)
        elif key.value == "never_exit":
            never = _never_exit(value, fail)
        else:
            raise fail(key, f"unknown section {key.value!r} (expected tasks, never_exit)")
    return PolicyFile(tasks, never)


def _mapping(node: yaml.Node, what: str, fail: Any) -> list[tuple[yaml.ScalarNode, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise fail(node, f"{what} must be a mapping")
    seen: set[str] = set()
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or not key.value:
            raise fail(key, f"{what}: keys must be names")
        if key.value in seen:
            raise fail(key, f"{what}: {key.value!r} appears twice")
        seen.add(key.value)
    return node.value


def _settings(node: yaml.Node, task: str, fail: Any) -> EarlyExitSettings:
    try:
        if isinstance(node, yaml.ScalarNode):
            if node.value.lower() in OFF:
                return EarlyExitSettings()
            return resolve_early_exit(preset=node.value)
        fields = {k.value: yaml.safe_load(yaml.serialize(v)) for k, v in _mapping(node, task, fail)}
        unknown = set(fields) - {"threshold", "min_layers"}
        if unknown or "threshold" not in fields:
            raise ConfigError("expected {threshold: 0..1, min_layers: 0..1}")
        return resolve_early_exit(
            threshold=fields["threshold"], min_layers_fraction=fields.get("min_layers")
        )
    except ConfigError as exc:
        if isinstance(exc, PolicyFileError):
            raise
        raise fail(node, f"task {task!r}: {exc}") from None


def _never_exit(node: yaml.Node, fail: Any) -> NeverExit:
    flags: dict[str, bool] = {}
    strings: tuple[str, ...] = ()
    for key, value in _mapping(node, "never_exit", fail):
        if key.value in TOKEN_CLASSES:
            parsed = yaml.safe_load(yaml.serialize(value))
            if not isinstance(parsed, bool):
                raise fail(value, f"never_exit.{key.value} must be true or false")
            flags[key.value] = parsed
        elif key.value == "strings":
            parsed = yaml.safe_load(yaml.serialize(value))
            if not isinstance(parsed, list) or not all(isinstance(s, str) and s for s in parsed):
                raise fail(value, "never_exit.strings must be a list of non-empty strings")
            strings = tuple(parsed)
        else:
            names = ", ".join((*TOKEN_CLASSES, "strings"))
            raise fail(key, f"unknown token class {key.value!r} (expected {names})")
    return NeverExit(**flags, strings=strings)
