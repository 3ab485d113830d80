"""The simulated rigs end to end: the plugin's fixtures on rigs/sim-*.yaml (the default rigs),
the real drivers, and a board carried from a flashed base image through a whole update."""

from __future__ import annotations

from pathlib import Path

import pytest

from hil.onenet.codes import TaskState
from hil.onenet.tasks import Package
from hil.rig.model import SIM_ROOT_VARIABLE, load_rig
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
            text.replace("${HIL_SIM_ROOT}/", f"{tmp_path}/"))
    rigs.joinpath("lab-x.yaml").write_text("not: a simulated rig, not selected by default\n")
    pytester.makepyfile(test_x="""
        def test_version(rig, board):
            assert board.version() == "1.0.0"
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_version?sim-gd32? PASSED*",
                                 "*test_version?sim-nrf52832? PASSED*"])


def test_two_checkouts_never_share_a_simulated_board(tmp_path, monkeypatch):
    """The simulated rigs keep their boards under ${HIL_SIM_ROOT}: one directory per rigs
    directory (a checkout), the same for every command of that checkout, or the variable's
    value when set. Two checkouts' suites at once on one machine once shared a simulated ESP32's
    files, and a test of one met what the other's firmware model had left there."""
    monkeypatch.delenv(SIM_ROOT_VARIABLE, raising=False)
    checkouts = []
    for name in ("one", "two"):
        rigs = tmp_path / name / "rigs"
        rigs.mkdir(parents=True)
        for board in ("esp32", "nrf52832"):
            (rigs / f"sim-{board}.yaml").write_text(
                (ROOT / "rigs" / f"sim-{board}.yaml").read_text())
        checkouts.append({board: load_rig(rigs / f"sim-{board}.yaml")
                          for board in ("esp32", "nrf52832")})
    one, two = checkouts
    assert one["esp32"].sim_state_dir != two["esp32"].sim_state_dir
    for rigs in checkouts:
        root = rigs["esp32"].sim_state_dir.parent
        assert root == rigs["nrf52832"].sim_state_dir.parent
        assert rigs["esp32"].console.url == f"hilsim://{root}/sim-esp32"
        assert rigs["nrf52832"].console.port == f"{root}/sim-nrf52832/console"
        assert str(rigs["esp32"].power.url) == f"{root}/sim-esp32/supply"
    # Read again, a checkout's rig finds the same board; the variable puts them where it says.
    again = load_rig(tmp_path / "one" / "rigs" / "sim-esp32.yaml")
    assert again.sim_state_dir == one["esp32"].sim_state_dir
    monkeypatch.setenv(SIM_ROOT_VARIABLE, str(tmp_path / "shared"))
    for name in ("one", "two"):
        rig = load_rig(tmp_path / name / "rigs" / "sim-esp32.yaml")
        assert rig.sim_state_dir == tmp_path / "shared" / "sim-esp32"
