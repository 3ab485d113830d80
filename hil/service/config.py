"""Task files for ``hil serve --tasks FILE.yaml``: several devices, each with its tasks.

::

    product_id: "245528"            # optional; --product-id wins
    devices:
      - dev_id: "527776559"
        name: bench-01              # optional: the device name of device-level tokens
        access_key_env: DEV01_KEY   # optional: the device's own key, read from this variable
        version: "1.0.0"            # optional: the version the service has on record
        tasks:
          - type: 2                 # 1 FOTA (module), 2 SOTA (MCU application); default 1
            manuf: "102"
            model: "10201"
            target: "1.1.0"
            package: app-1.1.0.bin  # a file under this file's directory (or --packages-dir)
            signal: 10
            power: 50
            retry: 3                # default 3
            interval: 5             # seconds; default 2

The defaults are those of ``hil serve``'s single task (``FIRST_RUN_*``): what the vendor's own
example client needs to get through a first run.

Keys are checked at load: a mistake is one ``ConfigError`` line naming the file and the key.
Access keys never live in the file, only the name of the variable that holds one.

What a task file may serve: the service hands a task's package to any client holding a valid
token, so a package is a **regular file under the task file's directory** (or under the directory
``hil serve --packages-dir`` names, instead), of at most ``MAX_PACKAGE_BYTES`` (64 MiB;
``--max-package-mib``), read whole once at load. ``/etc/shadow``, ``../../x``, a symlink that
resolves outside, ``/proc/self/environ``, a FIFO or a device are refused at load, before anything
is served, each in one line naming the file, the key and why; a FIFO or a device is never opened.
A task's ``token``, when given, must be one a request path can carry (1..64 of
``[A-Za-z0-9_-.]``).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field

from hil.configfile import STRICT, load_model
from hil.errors import ConfigError
from hil.onenet.codes import TaskType, is_valid_version
from hil.onenet.messages import is_valid_token
from hil.onenet.tasks import Package, Task
from hil.service.mock import OtaService

NonNegative = Annotated[int, Field(ge=0, strict=True)]

# Defaults of a task made by `hil serve` (flags or task file). The vendor's example client detects
# FOTA (type 1), and with retry 0 it gives up on the first chunk that fails, so a first run over a
# lab network falls over on one lost packet. Three retries two seconds apart ride out a dropped
# chunk or a gateway restart, yet a device that cannot download still fails within seconds.
FIRST_RUN_TYPE = TaskType.FOTA
FIRST_RUN_RETRY = 3
FIRST_RUN_INTERVAL_S = 2

# A package is held in memory whole (each download is a slice of it). 64 MiB is several times the
# largest OTA image of the boards hil knows (a few MiB of ESP32 app slot), yet a mistake such as
# a disk image named as a package fails in one line instead of filling the host's memory.
MAX_PACKAGE_BYTES = 64 * 1024 * 1024


def _version(value: Any) -> Any:
    if value is None:
        return None
    # YAML reads 1.10 as the float 1.1: refuse numbers instead of silently losing digits.
    if not isinstance(value, str):
        raise ValueError("quote version strings (YAML turns 1.10 into the number 1.1)")
    if not is_valid_version(value):
        raise ValueError(f"{value!r} is not 1..20 of [a-zA-Z0-9_-.]")
    return value


Version = Annotated[str, BeforeValidator(_version)]
OptionalVersion = Annotated[str | None, BeforeValidator(_version)]


def _token(value: str | None) -> str | None:
    # A token the download routes cannot match ("a/b", 65 characters) makes a task that detect
    # offers and no download can reach: refused here, not discovered on a bench.
    if value is not None and not is_valid_token(value):
        raise ValueError(f"{value!r} cannot be in a request path: 1..64 of [A-Za-z0-9_-.]")
    return value


Token = Annotated[str | None, AfterValidator(_token)]


class TaskEntry(BaseModel):
    model_config = STRICT

    type: TaskType = FIRST_RUN_TYPE
    target: Version
    package: str | None = None
    delta_from: OptionalVersion = None
    manuf: str | None = None
    model: str | None = None
    signal: Annotated[int, Field(strict=True)] = 0
    power: Annotated[int, Field(strict=True)] = 0
    retry: NonNegative = FIRST_RUN_RETRY
    interval: NonNegative = FIRST_RUN_INTERVAL_S
    enforce_thresholds: bool = False
    token: Token = None


class DeviceEntry(BaseModel):
    model_config = STRICT

    dev_id: Annotated[str, Field(min_length=1)]
    name: str | None = None
    access_key_env: str | None = None
    version: OptionalVersion = None
    tasks: list[TaskEntry] = []


class TaskFile(BaseModel):
    model_config = STRICT

    product_id: str | None = None
    devices: Annotated[list[DeviceEntry], Field(min_length=1)]


def load_task_file(path: Path) -> TaskFile:
    return load_model(TaskFile, path)


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def _read_regular(path: Path, shown: str, where: str, limit: int) -> tuple[tuple[int, int], bytes]:
    """The whole content of the regular file ``path`` (named ``shown`` in messages) and its
    identity (device, inode). Whatever is not a regular file is refused from its ``stat``, never
    opened for reading: opening a FIFO blocks until a writer comes, /dev/zero never ends."""
    try:
        status = os.stat(path)
        if not stat.S_ISREG(status.st_mode):
            kind = next((name for test, name in _KINDS if test(status.st_mode)), "special")
            raise ConfigError(where, f"{shown} is not a regular file ({kind})")
        # Files of /proc and /sys say 0 (or a page) whatever they hold: "empty" refuses the first
        # without opening them; the length check below the second.
        if status.st_size == 0:
            raise ConfigError(where, f"{shown} is empty")
        if status.st_size > limit:
            raise ConfigError(where, f"{shown} is {status.st_size} bytes, over the limit of "
                                     f"{limit} bytes for a package")
        # O_NONBLOCK: should a FIFO take the file's place after the stat, opening it returns.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (status.st_dev, status.st_ino):
                raise ConfigError(where, f"{shown} was replaced while it was read")
            chunks: list[bytes] = []
            left = status.st_size + 1    # one byte more: a file that grew is not read on
            while left > 0 and (chunk := os.read(fd, min(left, 1024 * 1024))):
                chunks.append(chunk)
                left -= len(chunk)
        finally:
            os.close(fd)
    except OSError as error:
        raise ConfigError(where, f"cannot read package {shown}: {error.strerror}") from None
    data = b"".join(chunks)
    if len(data) != status.st_size:
        raise ConfigError(where, f"{shown} changed while it was read ({status.st_size} bytes at "
                                 f"open, {len(data)} read)")
    return (status.st_dev, status.st_ino), data


def read_package(path: Path, where: str, *, limit: int = MAX_PACKAGE_BYTES) -> Package:
    """The package file the operator named (``--package``, ``--hil-package``): a regular file of
    at most ``limit`` bytes, wherever it is."""
    _, data = _read_regular(path, str(path), where, limit)
    return Package(data, path.name)


@dataclass
class PackageFiles:
    """The packages of one task file: files under ``root`` (resolved, symlinks included), each
    read once however many tasks name it."""

    root: Path
    limit: int = MAX_PACKAGE_BYTES
    _read: dict[tuple[int, int], bytes] = field(default_factory=dict, init=False)

    def load(self, name: str, where: str) -> Package:
        root = self.root.absolute()
        path = root / name          # an absolute name stays itself
        inside = Path(os.path.normpath(path))
        if not inside.is_relative_to(root):
            raise ConfigError(where, f"{name} is outside {root} {_WHERE_PACKAGES_ARE}")
        resolved = path.resolve()
        if not resolved.is_relative_to(root.resolve()):
            raise ConfigError(where, f"{name} resolves to {resolved}, outside {root} "
                                     f"{_WHERE_PACKAGES_ARE}")
        try:
            identity = os.stat(resolved)
        except OSError as error:
            raise ConfigError(where, f"cannot read package {path}: {error.strerror}") from None
        data = self._read.get((identity.st_dev, identity.st_ino))
        if data is None:
            key, data = _read_regular(resolved, name, where, self.limit)
            self._read[key] = data
        return Package(data, inside.name)


_WHERE_PACKAGES_ARE = "(packages are files under the task file's directory or --packages-dir)"


def apply_task_file(service: OtaService, path: Path, *, packages_dir: Path | None = None,
                    max_package_bytes: int = MAX_PACKAGE_BYTES) -> list[Task]:
    """Register the file's devices and create their tasks on ``service``; the tasks made.
    Packages are files under ``packages_dir``, by default the task file's directory."""
    spec = load_task_file(path)
    packages = PackageFiles(packages_dir if packages_dir is not None else path.parent,
                            max_package_bytes)
    created: list[Task] = []
    for d, device in enumerate(spec.devices):
        where = f"{path}: devices[{d}]"
        key = None
        if device.access_key_env:
            key = os.environ.get(device.access_key_env)
            if not key:
                raise ConfigError(f"{where}.access_key_env",
                                  f"environment variable {device.access_key_env} is not set")
        try:
            service.add_device(device.dev_id, name=device.name, access_key=key)
        except ValueError as error:
            raise ConfigError(f"{where}.access_key_env", str(error)) from None
        for t, task in enumerate(device.tasks):
            package = (packages.load(task.package, f"{where}.tasks[{t}].package")
                       if task.package else None)
            try:
                created.append(service.create_task(
                    device.dev_id, task.target, package, task_type=task.type,
                    manuf=task.manuf, model=task.model, delta_from=task.delta_from,
                    signal=task.signal, power=task.power, retry=task.retry,
                    interval=task.interval, enforce_thresholds=task.enforce_thresholds,
                    token=task.token))
            except ConfigError as error:
                raise ConfigError(f"{where}.tasks[{t}]", error.message) from None
        if device.version:
            # The version of what the device's tasks update (SOTA for a device with none).
            for task_type in {task.type for task in device.tasks} or {TaskType.SOTA}:
                service.set_device_version(device.dev_id, device.version, task_type)
    return created


def describe_task(task: Task) -> str:
    """One line of what ``hil serve`` serves: what a device's client must ask for and expect."""
    return (f"task {task.task_id}: dev_id={task.dev_id} type={int(task.type)} "
            f"({task.type.name}) target={task.target} retry={task.retry} "
            f"interval={task.interval}s")
