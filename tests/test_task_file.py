"""Task files for `hil serve --tasks`: valid ones load, every mistake is one line naming the key."""

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hil.errors import ConfigError
from hil.onenet.codes import TaskState, TaskType
from hil.service.config import apply_task_file, load_task_file
from hil.service.mock import OtaService
from hil.service.server import new_access_key


@pytest.fixture
def service() -> OtaService:
    return OtaService("245528", new_access_key())


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "app.bin").write_bytes(b"\x5a" * 1000)
    path = tmp_path / "tasks.yaml"
    path.write_text(text)
    return path


def test_a_full_task_file_creates_devices_and_tasks(tmp_path, service, monkeypatch):
    monkeypatch.setenv("DEV2_KEY", new_access_key())
    path = write(tmp_path, """
product_id: "245528"
devices:
  - dev_id: 527776559
    version: "1.0.0"
    tasks:
      - {type: 2, manuf: "102", model: "10201", target: "1.1.0", package: app.bin,
         signal: 10, power: 50, retry: 3, interval: 5}
      - {type: 1, target: "M2", package: app.bin, delta_from: "M1", enforce_thresholds: true}
  - dev_id: "527776560"
    name: bench-02
    access_key_env: DEV2_KEY
""")
    apply_task_file(service, path)
    sota = service.task("527776559", TaskType.SOTA)
    assert (sota.target, sota.manuf, sota.retry, sota.interval, sota.state) == \
        ("1.1.0", "102", 3, 5, TaskState.PENDING)
    assert sota.package is not None
    assert sota.package.filename == "app.bin"
    fota = service.task("527776559", TaskType.FOTA)
    assert (fota.delta_from, fota.enforce_thresholds) == ("M1", True)
    assert service.device_version("527776559") == "1.0.0"
    with pytest.raises(KeyError):
        service.task("527776560")


def test_a_task_with_only_target_and_package_is_ready_for_a_first_run(tmp_path, service):
    """The defaults of `hil serve`: FOTA, as the vendor's example client detects, with retries;
    the device's version is recorded for the type its task updates."""
    path = write(tmp_path, """
devices:
  - dev_id: "527776559"
    version: "1.0.0"
    tasks:
      - {target: "1.1.0", package: app.bin}
""")
    (made,) = apply_task_file(service, path)
    task = service.task("527776559", TaskType.FOTA)
    assert made == task
    assert (task.type, task.retry, task.interval) == (TaskType.FOTA, 3, 2)
    assert service.device_version("527776559", TaskType.FOTA) == "1.0.0"


@pytest.mark.parametrize(("body", "where"), [
    ("devices: []", "devices"),
    ("{}", "devices"),
    ("devices:\n  - {version: '1.0'}", "devices[0].dev_id"),
    ("devices:\n  - {dev_id: '1', colour: red}", "devices[0].colour"),
    ("devices:\n  - {dev_id: '1', version: 1.10}", "devices[0].version"),
    ("devices:\n  - {dev_id: '1', tasks: [{target: 1.1, package: app.bin}]}",
     "devices[0].tasks[0].target"),
    ("devices:\n  - {dev_id: '1', tasks: [{target: '1.1', package: app.bin, type: 3}]}",
     "devices[0].tasks[0].type"),
    ("devices:\n  - {dev_id: '1', tasks: [{target: '1.1', package: app.bin, retry: 'x'}]}",
     "devices[0].tasks[0].retry"),
    ("devices:\n  - {dev_id: '1', tasks: [{target: '1.1', package: app.bin, interval: -5}]}",
     "devices[0].tasks[0].interval"),
    ("devices:\n  - {dev_id: '1', tasks: [{target: 'a b', package: app.bin}]}",
     "devices[0].tasks[0].target"),
    ("devices:\n  - {dev_id: '1', tasks: [{target: '1.1', package: nope.bin}]}",
     "devices[0].tasks[0].package"),
    ("devices:\n  - {dev_id: '1', tasks: [{target: '1.1'}]}", "devices[0].tasks[0]"),
    ("devices:\n  - {dev_id: '1', access_key_env: HIL_TEST_UNSET_VARIABLE}",
     "devices[0].access_key_env"),
    ("devices:\n  - {dev_id: '1', tasks: [{target: '1', package: app.bin},"
     " {target: '2', package: app.bin}]}", "devices[0].tasks[1]"),
    ("devices: [", "line 1"),
])
def test_each_mistake_is_one_line_naming_file_and_key(tmp_path, service, body, where):
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as raised:
        apply_task_file(service, path)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {where}"), message


def test_an_unreadable_file_is_named(tmp_path, service):
    with pytest.raises(ConfigError, match=r"tasks\.yaml: cannot read"):
        apply_task_file(service, tmp_path / "tasks.yaml")


# Arbitrary YAML documents: whatever a user writes, loading ends in a task file or one ConfigError
# line, never another exception.
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False),
                     st.text(max_size=8), st.sampled_from(["1.0.0", "app.bin", "527776559"]))
_keys = st.sampled_from(["devices", "dev_id", "tasks", "target", "package", "type", "retry",
                         "interval", "version", "name", "signal", "x"])
_documents = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(_keys, inner, max_size=4)), max_leaves=12)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=_documents)
def test_any_document_loads_or_fails_with_one_config_line(tmp_path, document):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(document))
    message = ""
    try:
        load_task_file(path)
    except ConfigError as error:
        message = str(error)
    if message:
        assert "\n" not in message
        assert message.startswith(f"{path}: ")
