"""The rig side of hil's pytest plugin, end to end: a test project run by pytester in a subprocess.

Rig files are written into the project's rigs/; their consoles are never opened unless a test
asks for a console, so most of these rigs need no device at all.
"""

import json
import textwrap
from itertools import pairwise
from pathlib import Path

import pytest

from hil.sim.images import build_image

RIG = """
name: {name}
board: {board}
identity: {{product_id: "245528", dev_id: "{dev_id}"}}
console: {{url: "loop://"}}
{extra}
"""


def write_rig(root: Path, name: str, board: str = "nrf52832", dev_id: str = "1",
              extra: str = "") -> Path:
    (root / "rigs").mkdir(exist_ok=True)
    path = root / "rigs" / f"{name}.yaml"
    path.write_text(RIG.format(name=name, board=board, dev_id=dev_id, extra=extra))
    return path


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly",
                                         "--hil-lease-dir", str(pytester.path / "leases"), *args)


def stderr_lines(result: pytest.RunResult) -> list[str]:
    return [line for line in result.stderr.lines if line]


def test_tests_are_parametrized_over_the_selected_rigs(pytester):
    write_rig(pytester.path, "bench-a")
    write_rig(pytester.path, "bench-b", board="esp32", extra="flasher: {kind: esp}")
    pytester.makepyfile(test_x="""
        def test_on_a_rig(rig):
            assert rig.name in ("bench-a", "bench-b")

        def test_without_a_rig():
            pass
    """)
    result = run(pytester, "--hil-rig", "bench-a", "--hil-rig", "bench-b", "-v")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["hil: rigs bench-a (nrf52832), bench-b (esp32)*",
                                 "*test_on_a_rig?bench-a? PASSED*",
                                 "*test_on_a_rig?bench-b? PASSED*"])


def test_rigs_come_from_the_ini_file_too(pytester):
    write_rig(pytester.path, "bench-a")
    pytester.makeini("""
        [pytest]
        hil_rigs =
            bench-a
            rigs/bench-a.yaml
    """)
    pytester.makepyfile(test_x="def test_rig(rig): pass")
    # The same rig twice (by name and by path) is refused, and said so in one line.
    result = run(pytester)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --hil-rig: rig bench-a is selected twice"])


def test_with_no_rig_selected_rig_tests_skip_with_a_reason(pytester):
    pytester.makepyfile(test_x="def test_rig(board): pass")
    result = run(pytester, "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no rig selected and no rigs/sim-*.yaml: give --hil-rig*"])


def test_a_bad_rig_file_stops_the_run_with_one_line(pytester):
    path = write_rig(pytester.path, "bench-a", extra="flasher: {kind: swd}")
    pytester.makepyfile(test_x="def test_rig(rig): pass")
    result = run(pytester, "--hil-rig", "bench-a")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert stderr_lines(result) == [f"ERROR: {path}: flasher.probe: Field required"]
    result.stdout.no_fnmatch_line("*test_rig*")


@pytest.mark.parametrize(("args", "message"), [
    (["--hil-rig", "nowhere"], "*rigs/nowhere.yaml: cannot read: No such file or directory"),
    (["--hil-ota-service", "ftp://x"], "ERROR: --hil-ota-service: 'ftp://x' is neither mock*"),
    (["--hil-package", "missing.bin"], "ERROR: --hil-package: no such file missing.bin"),
    (["--hil-firmware", "base.hex"], "ERROR: --hil-firmware: no such file base.hex"),
])
def test_bad_options_are_one_line_usage_errors(pytester, args, message):
    pytester.makepyfile(test_x="def test_rig(rig): pass")
    result = run(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert len(stderr_lines(result)) == 1


def test_board_and_needs_markers_skip_with_the_rig_and_the_reason(pytester):
    write_rig(pytester.path, "bench-nrf", extra="power: {kind: console}")
    write_rig(pytester.path, "bench-esp", board="esp32",
              extra="power: {kind: scpi, url: 'socket://127.0.0.1:9'}")
    pytester.makepyfile(test_x="""
        import pytest

        @pytest.mark.board("esp32")
        def test_esp_only(rig):
            assert rig.board == "esp32"

        @pytest.mark.needs("power_cut")
        def test_cuts_power(rig):
            assert rig.power.kind == "scpi"

        @pytest.mark.needs("power")
        def test_low_power(rig):
            pass
    """)
    result = run(pytester, "--hil-rig", "bench-nrf", "--hil-rig", "bench-esp", "-rs")
    result.assert_outcomes(passed=4, skipped=2)
    result.stdout.fnmatch_lines_random([
        "*runs on esp32; rig bench-nrf is a nrf52832",
        "*rig bench-nrf lacks power_cut",
    ])


def test_an_unknown_capability_is_a_usage_error(pytester):
    write_rig(pytester.path, "bench-a")
    pytester.makepyfile(test_x="""
        import pytest

        @pytest.mark.needs("teleport")
        def test_x(rig):
            pass
    """)
    result = run(pytester, "--hil-rig", "bench-a")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown capability 'teleport'; known: console, flasher*"])


def test_a_rig_fault_in_the_test_body_is_an_error_naming_rig_and_part(pytester):
    write_rig(pytester.path, "bench-a")
    pytester.makepyfile(test_x="""
        from hil.errors import FirmwareFault, RigFault

        def test_port_vanishes(rig):
            raise RigFault("console", "port vanished", rig.name)

        def test_wrong_code(rig):
            raise FirmwareFault("reported 201 before rebooting")
    """)
    result = run(pytester, "--hil-rig", "bench-a")
    result.assert_outcomes(failed=1, errors=1)
    result.stdout.fnmatch_lines_random([
        "E * hil.errors.RigFault: rig bench-a: console: port vanished",
        "ERROR test_x.py::test_port_vanishes[[]bench-a[]] - hil.errors.RigFault*",
        "FAILED test_x.py::test_wrong_code[[]bench-a[]] - hil.errors.FirmwareFault*"])


def test_a_console_that_cannot_open_is_a_setup_error_naming_the_rig(pytester):
    (pytester.path / "rigs").mkdir()
    (pytester.path / "rigs" / "bench-a.yaml").write_text(textwrap.dedent("""
        name: bench-a
        board: nrf52832
        identity: {product_id: "245528", dev_id: "1"}
        console: {port: /dev/hil-no-such-port}
    """))
    pytester.makepyfile(test_x="def test_talks(console): pass")
    result = run(pytester, "--hil-rig", "bench-a")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*rig bench-a: console: */dev/hil-no-such-port*"])


def test_parts_a_rig_lacks_skip_rather_than_fail(pytester):
    write_rig(pytester.path, "bench-a")
    pytester.makepyfile(test_x="""
        def test_flasher(flasher): pass
        def test_power(power): pass
        def test_rf(rf): pass
    """)
    result = run(pytester, "--hil-rig", "bench-a", "-rs")
    result.assert_outcomes(skipped=3)
    result.stdout.fnmatch_lines(
        ["*rig bench-a has no flasher (add @pytest.mark.needs('flasher'))*"])


def test_ota_task_is_made_for_the_rigs_device_from_the_build_under_test(pytester, monkeypatch):
    write_rig(pytester.path, "bench-esp", board="esp32", dev_id="527776560")
    image = build_image("esp32", "2.0.0", payload_size=4096)
    (pytester.path / "app.bin").write_bytes(image)
    monkeypatch.setenv("HIL_ACCESS_KEY", "KuF3NT/jUBJ62LNBB/A8XZA9CqS3Cu79B/ABmfA1UCw=")
    pytester.makepyfile(test_x="""
        import requests

        def test_task(ota_task, ota_service, timeline):
            assert (ota_task.dev_id, ota_task.target) == ("527776560", "2.0.0")
            assert (ota_task.manuf, ota_task.model) == ("101", "10101")
            assert ota_task.package.size == IMAGE_SIZE
            answer = requests.get(f"{ota_service.url}/ota/south/check", timeout=5, params={
                "dev_id": "527776560", "type": 2, "version": "1.0.0", "cdn": "true",
                "manuf": "101", "model": "10101"},
                headers={"Authorization": ota_service.authorization()}).json()
            assert answer["data"]["token"] == ota_task.token
            assert [e.phase for e in timeline] == ["detect"]

        def test_service_is_empty_again(ota_service, timeline):
            assert len(timeline) == 0
    """.replace("IMAGE_SIZE", str(len(image))))
    result = run(pytester, "--hil-rig", "bench-esp", "--hil-package", "app.bin",
                 "--hil-target-version", "2.0.0")
    result.assert_outcomes(passed=2)


def test_without_a_build_ota_task_skips_and_without_a_key_it_is_a_rig_fault(pytester,
                                                                              monkeypatch):
    write_rig(pytester.path, "bench-a")
    monkeypatch.delenv("HIL_ACCESS_KEY", raising=False)
    pytester.makepyfile(test_x="""
        def test_needs_a_build(ota_task): pass
    """)
    result = run(pytester, "--hil-rig", "bench-a", "-rs")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*rig bench-a: identity: HIL_ACCESS_KEY is not set*"])
    monkeypatch.setenv("HIL_ACCESS_KEY", "KuF3NT/jUBJ62LNBB/A8XZA9CqS3Cu79B/ABmfA1UCw=")
    result = run(pytester, "--hil-rig", "bench-a", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no OTA build given: --hil-package and --hil-target-version*"])


LEASE_PROBE = """
    import json, os, time
    import pytest

    @pytest.mark.parametrize("n", range(4))
    def test_holds_the_rig(rig, n):
        start = time.monotonic()
        time.sleep(0.3)
        with open({log!r}, "a") as log:
            log.write(json.dumps([rig.name, os.getpid(), start, time.monotonic()]) + "\\n")
"""


@pytest.mark.parametrize("dist", ["load", "loadgroup"])
def test_under_xdist_each_rig_is_used_by_one_worker_at_a_time(pytester, dist):
    for name in ("bench-a", "bench-b", "bench-c"):
        write_rig(pytester.path, name)
    log = pytester.path / "leases.log"
    pytester.makepyfile(test_x=LEASE_PROBE.format(log=str(log)))
    result = run(pytester, "-n", "3", "--dist", dist, "--hil-rig", "bench-a",
                 "--hil-rig", "bench-b", "--hil-rig", "bench-c")
    result.assert_outcomes(passed=12)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {name for name, *_ in records} == {"bench-a", "bench-b", "bench-c"}
    for name in ("bench-a", "bench-b", "bench-c"):
        spans = sorted((start, end) for rig, _, start, end in records if rig == name)
        assert len(spans) == 4
        # No two tests held the same rig at once, whichever workers ran them.
        assert all(end <= next_start for (_, end), (next_start, _) in pairwise(spans))
    assert len({pid for _, pid, _, _ in records}) == 3   # the three workers all took part


def test_a_rig_failing_its_check_has_every_test_end_as_a_rig_fault(pytester):
    (pytester.path / "rigs").mkdir()
    (pytester.path / "rigs" / "bench-dead.yaml").write_text(textwrap.dedent("""
        name: bench-dead
        board: nrf52832
        identity: {product_id: "245528", dev_id: "1"}
        console: {url: "socket://127.0.0.1:9"}
    """))
    pytester.makepyfile(test_x="""
        import pytest

        @pytest.mark.parametrize("n", range(3))
        def test_on_the_rig(rig, n):
            pass

        def test_without_a_rig():
            pass
    """)
    result = run(pytester, "--hil-rig", "bench-dead", "--hil-check-rigs", "-rE")
    result.assert_outcomes(passed=1, errors=3)
    result.stdout.fnmatch_lines(["*RigFault: rig bench-dead: console: failed the rig check "
                                 "before the suite: *"])
    # Without the check the same tests run (they do not touch the console).
    run(pytester, "--hil-rig", "bench-dead").assert_outcomes(passed=4)
