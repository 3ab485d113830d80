"""Input files read with bounds, into typed, frozen models, every mistake one line naming the file.

Rig, task, waiver and profile files load through ``load_model``: one place decides how a YAML
error or a validation error reads (``rigs/bench-01.yaml: console.baudrate: Input should be a valid
integer``). Every file hil reads from a user (those, results JSON, firmware images) goes through
``read_bounded`` first, so no input can hang or exhaust hil:

- only a regular file is read: a FIFO, a device (``/dev/zero``), a socket or a directory is
  refused from its ``stat``, before any ``open`` could block on it;
- a size limit per kind of file (``YAML_LIMIT`` 1 MiB for a rig, task, waiver or profile file,
  ``JSON_LIMIT`` 64 MiB for one Allure result or coverage file, ``IMAGE_LIMIT`` 64 MiB for a
  firmware package or base image), checked on the size and again while reading;
- YAML and JSON nested too deep (Python's recursion limit), a number past Python's 4300-digit
  conversion limit, YAML aliases expanding past ``YAML_VALUES`` values: one line, no traceback;
- a value quoted back in a message is cut to ``QUOTE_LIMIT`` characters.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from hil.errors import ConfigError

# Frozen, no unknown keys; ids written as bare numbers (dev_id: 527776559) become strings.
STRICT = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)

Model = TypeVar("Model", bound=BaseModel)

MiB = 1024 * 1024
YAML_LIMIT = 1 * MiB        # a rig file is a few KiB; the largest task file a few hundred
JSON_LIMIT = 64 * MiB       # one allure-pytest result, attachments being files of their own
IMAGE_LIMIT = 64 * MiB      # the largest flash of the supported families is 16 MiB (ESP32)
YAML_VALUES = 100_000       # values of a YAML document once its aliases are expanded
YAML_DEPTH = 100            # nesting of a YAML document (a rig file nests 4 deep)
QUOTE_LIMIT = 60            # characters of a value quoted back in a message
_CHUNK = 1 * MiB

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def _not_regular(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _size(count: int) -> str:
    if count >= MiB:
        return f"{count // MiB} MiB" if count % MiB == 0 else f"{count / MiB:.1f} MiB"
    return f"{count} bytes"


def _refuse_unless_regular(path: Path, mode: int, what: str) -> None:
    kind = _not_regular(mode)
    if kind is not None:
        raise ConfigError(str(path), f"cannot read: {kind}, not a {what} (hil reads regular "
                                     "files only)")


def read_bounded(path: Path, limit: int, what: str = "file") -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes; ConfigError naming it
    otherwise (``what`` says what it should have been: "rig file", "package")."""
    try:
        # stat() never blocks; an open() of a FIFO waits for a writer, a device never ends.
        _refuse_unless_regular(path, os.stat(path).st_mode, what)
        # O_NONBLOCK: were it swapped for a FIFO since the stat, the open still returns.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(descriptor, "rb") as file:
            info = os.fstat(file.fileno())
            _refuse_unless_regular(path, info.st_mode, what)
            if info.st_size > limit:
                raise ConfigError(str(path), f"{_size(info.st_size)}: larger than the "
                                             f"{_size(limit)} hil reads of a {what}")
            chunks, total = [], 0
            while total <= limit:           # a file growing while read stops at the limit too
                chunk = file.read(min(_CHUNK, limit + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
            if total > limit:
                raise ConfigError(str(path), f"larger than the {_size(limit)} hil reads of a "
                                             f"{what}")
            return b"".join(chunks)
    except OSError as error:
        raise ConfigError(str(path), f"cannot read: {error.strerror or error}") from None


def shorten(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` cut to ``limit`` characters (an ellipsis says it was)."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


# A quoted value inside a message: 'xxx' or "xxx" (pydantic and our validators quote so).
_QUOTED = re.compile(rf"'[^'\n]{{{QUOTE_LIMIT + 1},}}'|\"[^\"\n]{{{QUOTE_LIMIT + 1},}}\"")


def shorten_quoted(message: str) -> str:
    """Every quoted value of ``message`` cut to ``QUOTE_LIMIT`` characters, and the message to
    one line: an error never echoes a megabyte the user wrote."""
    message = _QUOTED.sub(lambda found: found[0][0] + shorten(found[0][1:-1]) + found[0][0],
                          message)
    line = " ".join(message.splitlines())
    return shorten(line, 8 * QUOTE_LIMIT)


def key_path(location: tuple[int | str, ...]) -> str:
    """pydantic's error location as a key path: ``devices[0].tasks[1].retry``."""
    text = ""
    for part in location:
        # A YAML key may hold anything, a line break or a megabyte included: one short line.
        name = part if isinstance(part, str) and part.isprintable() else repr(part)
        name = shorten(name) if isinstance(part, str) else name
        text += f"[{part}]" if isinstance(part, int) else (f".{name}" if text else name)
    return text or "(top level)"


def read_yaml(path: Path, limit: int = YAML_LIMIT, what: str = "YAML file") -> Any:
    """The YAML document of ``path`` (at most ``limit`` bytes, at most ``YAML_VALUES`` values
    with its aliases expanded, at most ``YAML_DEPTH`` deep)."""
    data = read_bounded(path, limit, what)
    try:
        document = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(str(path), f"not UTF-8 text (byte {error.start})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(str(path), f"{line}not valid YAML") from None
    except RecursionError:
        raise ConfigError(str(path), "not valid YAML: nested too deep") from None
    except ValueError as error:   # e.g. an integer past Python's 4300-digit conversion limit
        raise ConfigError(str(path), f"not valid YAML: {_first_line(error)}") from None
    _check_size(document, str(path))
    return document


def _check_size(document: Any, where: str) -> None:
    """Refuse a document too deep or, its aliases expanded, too big to validate: a few lines of
    ``&a [*b, *b, ...]`` expand to billions of values ("billion laughs")."""
    stack: list[tuple[Any, int]] = [(document, 0)]
    values = 0
    while stack:
        node, depth = stack.pop()
        values += 1
        if values > YAML_VALUES:
            raise ConfigError(where, f"not valid YAML: more than {YAML_VALUES} values (aliases "
                                     "expanding?)")
        if depth > YAML_DEPTH:
            raise ConfigError(where, f"not valid YAML: nested more than {YAML_DEPTH} deep")
        children = node.items() if isinstance(node, dict) else \
            node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, tuple):          # a (key, value) pair: both are values
                stack.extend((part, depth + 1) for part in child)
            else:
                stack.append((child, depth + 1))


def load_json(path: Path, limit: int = JSON_LIMIT, what: str = "JSON file") -> Any:
    """The JSON document of ``path`` (at most ``limit`` bytes); one line naming the file for
    anything that is not JSON Python can hold."""
    data = read_bounded(path, limit, what)
    try:
        return json.loads(data)
    except json.JSONDecodeError as error:
        raise ConfigError(str(path), f"line {error.lineno}: not valid JSON") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "not valid JSON: not UTF-8 text") from None
    except RecursionError:
        raise ConfigError(str(path), "not valid JSON: nested too deep") from None
    except ValueError as error:   # an integer past Python's 4300-digit conversion limit
        raise ConfigError(str(path), f"not valid JSON: {_first_line(error)}") from None


def _first_line(error: Exception) -> str:
    # "Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits;
    # use sys.set_int_max_str_digits()...": the advice is for programmers, not for users.
    return shorten(str(error).split(";")[0].splitlines()[0] if str(error) else
                   type(error).__name__, 2 * QUOTE_LIMIT)


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
        raise ConfigError(f"{where}: {key}", shorten_quoted(message) + more) from None
    except RecursionError:       # a document built in code, not read by read_yaml
        raise ConfigError(where, "nested too deep") from None


_NAMED = re.compile(r"^([a-z_][a-z0-9_.]*): (.+)$")


def load_model(model: type[Model], path: Path, what: str = "YAML file") -> Model:
    return validate(model, read_yaml(path, what=what), str(path))


def _is_tag(part: int | str) -> bool:
    return isinstance(part, str) and part.startswith("kind=")
