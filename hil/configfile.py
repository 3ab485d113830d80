"""YAML files into typed, frozen models, with every mistake as one line naming file and key.

Task files and rig files both load through ``load_model``: one place decides how a YAML error or a
validation error reads (``rigs/bench-01.yaml: console.baudrate: Input should be a valid integer``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from hil.errors import ConfigError

# Frozen, no unknown keys; ids written as bare numbers (dev_id: 527776559) become strings.
STRICT = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)

Model = TypeVar("Model", bound=BaseModel)


def key_path(location: tuple[int | str, ...]) -> str:
    """pydantic's error location as a key path: ``devices[0].tasks[1].retry``."""
    text = ""
    for part in location:
        # A YAML key may hold anything, a line break included: the message stays one line.
        name = part if isinstance(part, str) and part.isprintable() else repr(part)
        text += f"[{part}]" if isinstance(part, int) else (f".{name}" if text else name)
    return text or "(top level)"


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(str(path), f"cannot read: {error.strerror}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(str(path), f"{line}not valid YAML") from None
    except UnicodeDecodeError as error:
        raise ConfigError(str(path), f"not UTF-8 text (byte {error.start})") from None
    except ValueError as error:   # e.g. an integer past Python's 4300-digit conversion limit
        raise ConfigError(str(path), f"not valid YAML: {str(error).splitlines()[0]}") from None


def validate(model: type[Model], raw: Any, where: str) -> Model:
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        # Tagged unions put the tag in the location (flasher.kind=swd.probe): drop it.
        key = key_path(tuple(part for part in first["loc"] if not _is_tag(part)))
        message = first["msg"].removeprefix("Value error, ")
        # A check across keys (a model validator) names its key itself: "flasher.kind: ...".
        named = _NAMED.match(message)
        if named and key == "(top level)":
            key, message = named.groups()
        elif named and "." not in named.group(1):
            key, message = f"{key}.{named.group(1)}", named.group(2)
        more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
        raise ConfigError(f"{where}: {key}", message + more) from None


_NAMED = re.compile(r"^([a-z_][a-z0-9_.]*): (.+)$")


def load_model(model: type[Model], path: Path) -> Model:
    return validate(model, read_yaml(path), str(path))


def _is_tag(part: int | str) -> bool:
    return isinstance(part, str) and part.startswith("kind=")
