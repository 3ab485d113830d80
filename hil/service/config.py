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
            package: app-1.1.0.bin  # relative to this file
            signal: 10
            power: 50
            retry: 3                # default 3
            interval: 5             # seconds; default 2

The defaults are those of ``hil serve``'s single task (``FIRST_RUN_*``): what the vendor's own
example client needs to get through a first run.

Keys are checked at load: a mistake is one ``ConfigError`` line naming the file and the key.
Access keys never live in the file, only the name of the variable that holds one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field

from hil.configfile import STRICT, load_model
from hil.errors import ConfigError
from hil.onenet.codes import TaskType, is_valid_version
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
    token: str | None = None


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


def read_package(path: Path, where: str) -> Package:
    try:
        return Package(path.read_bytes(), path.name)
    except OSError as error:
        raise ConfigError(where, f"cannot read package {path}: {error.strerror}") from None


def apply_task_file(service: OtaService, path: Path) -> list[Task]:
    """Register the file's devices and create their tasks on ``service``; the tasks made."""
    spec = load_task_file(path)
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
            package = (read_package(path.parent / task.package, f"{where}.tasks[{t}].package")
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
