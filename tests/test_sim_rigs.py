"""The simulated rigs end to end: the plugin's fixtures on rigs/sim-*.yaml (the default rigs),
the real drivers, and a board carried from a flashed base image through a whole update."""

from __future__ import annotations

from pathlib import Path

import pytest

from hil.onenet.codes import TaskState
from hil.onenet.tasks import Package
from hil.sim.images import build_image

ROOT = Path(__file__).resolve().parent.parent


def test_a_board_is_updated_from_its_flashed_base_image_to_the_new_version(
        rig, board, ota_service, tmp_path):
    base = tmp_path / "base.bin"
    base.write_bytes(build_image(rig.board, "1.0.0"))
    # Flashed through the rig's flasher: pyocd for the SWD boards, esptool for the ESP32.
    assert board.restore_base(base) == "1.0.0"

    service = ota_service.service
    service.add_device(rig.identity.dev_id)
    task = service.create_task(rig.identity.dev_id, "1.1.0",
                               Package(build_image(rig.board, "1.1.0"), "app-1.1.0.bin"),
                               manuf=rig.family.manuf, model=rig.family.model)
    board.point_at(ota_service.url)
    since = board.console.mark()
    board.start_update()
    events = board.wait_update_end(timeout=60)

    phases = [event.fields.get("phase") for event in events]
    assert phases[:3] == ["detect", "token", "download"]
    assert phases[-3:] == ["verify", "flash", "report"] or phases[-4:-1] == [
        "verify", "report", "flash"]
    # The board's own boot line, after the reboot that installed the new image.
    assert board.console.expect(board.contract.events["boot"], 1, since=since).group(
        "version") == "1.1.0"
    assert service.timeline.reported_codes(rig.identity.dev_id) == [101, 201]
    assert service.task(rig.identity.dev_id).state is TaskState.SUCCEEDED
    assert service.task(rig.identity.dev_id).target == task.target
    assert board.version() == "1.1.0"


@pytest.mark.needs("power")
def test_a_low_supply_voltage_is_a_low_battery_report(rig, board, power, ota_service):
    service = ota_service.service
    service.add_device(rig.identity.dev_id)
    service.create_task(rig.identity.dev_id, "1.1.0",
                        Package(build_image(rig.board, "1.1.0"), "app-1.1.0.bin"),
                        manuf=rig.family.manuf, model=rig.family.model, power=30)
    power.set_level(20)          # the bench supply's voltage, read by the board's fuel gauge
    board.point_at(ota_service.url)
    board.start_update()
    board.wait_update_end(timeout=30)
    assert service.timeline.reported_codes(rig.identity.dev_id) == [105]


def test_with_no_rig_selected_the_plugin_runs_on_the_simulated_rigs(pytester, tmp_path):
    rigs = pytester.path / "rigs"
    rigs.mkdir()
    for board in ("nrf52832", "gd32"):
        text = (ROOT / "rigs" / f"sim-{board}.yaml").read_text()
        # The same rigs, their state in this test's directory.
        rigs.joinpath(f"sim-{board}.yaml").write_text(
            text.replace("/tmp/hil-sim/", f"{tmp_path}/"))
    rigs.joinpath("lab-x.yaml").write_text("not: a simulated rig, not selected by default\n")
    pytester.makepyfile(test_x="""
        def test_version(rig, board):
            assert board.version() == "1.0.0"
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_version?sim-gd32? PASSED*",
                                 "*test_version?sim-nrf52832? PASSED*"])
