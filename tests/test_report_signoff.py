"""The release sign-off (hil.report.signoff) on real allure-results of real allure-pytest runs:
GO, NO-GO on a failure, rig faults explained by a retry or a waiver, nothing tested, two hosts
merged, secrets kept out, bad input as one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from allure_runs import BUILD, AllureRun, Case

from hil.cli import main
from hil.report.signoff import Status, decide, load_waivers, read_results, write

GOOD = {
    "esp32-detect": Case("esp32", "detect", "happy path"),
    "esp32-download": Case("esp32", "download", "stall once"),
    "gd32-download": Case("gd32", "download", "stall once"),
    "gd32-flash": Case("gd32", "flash", "power cut"),
}


def counts(signoff, board, phase):
    row = next(row for row in signoff.rows if (row.board, row.phase) == (board, phase))
    return {str(status): row.counts.get(status, 0) for status in
            (Status.PASSED, Status.FAILED, Status.BROKEN, Status.SKIPPED)}


def test_every_test_passed_is_go_with_the_build_and_the_board_x_phase_table(tmp_path):
    signoff = decide(read_results([AllureRun(tmp_path).run(GOOD)]))
    assert signoff.go, signoff.verdict_line()
    assert signoff.verdict_line().startswith("GO (every check): the results hold")
    assert (signoff.build, signoff.tests) == (BUILD, 4)
    assert counts(signoff, "gd32", "download") == \
        {"passed": 1, "failed": 0, "broken": 0, "skipped": 0}
    assert signoff.coverage_line() == "coverage: esp32 2/2, gd32 2/2"
    assert [(row.board, row.phase) for row in signoff.rows] == \
        [("esp32", "detect"), ("esp32", "download"), ("gd32", "download"), ("gd32", "flash")]

    markdown, document = write(signoff, tmp_path / "report")
    summary = json.loads(document.read_text())
    assert summary["verdict"] == "GO"
    assert summary["firmware"]["build"] == BUILD
    assert summary["totals"] == {"passed": 4, "failed": 0, "broken": 0, "skipped": 0}
    assert [(board["board"], board["ran"], board["expected"]) for board in summary["coverage"]] \
        == [("esp32", 2, 2), ("gd32", 2, 2)]
    text = markdown.read_text()
    assert f"# Release sign-off: firmware {BUILD}" in text
    assert "| gd32 | download | 1 | 0 | 0 | 0 |" in text


def test_a_failed_scenario_is_no_go_naming_board_phase_and_message(tmp_path):
    cases = {**GOOD, "gd32-download": Case("gd32", "download", "stall once", "failed")}
    signoff = decide(read_results([AllureRun(tmp_path).run(cases)]))
    assert not signoff.go
    assert signoff.decided_by == "no failed test"
    assert signoff.verdict_line() == (
        "NO-GO (no failed test): failed on gd32/download, rig bench-gd32: "
        "test_scenario[bench-gd32-gd32-download]: AssertionError: download phase: expected "
        "report codes [104], received [101]")
    assert counts(signoff, "gd32", "download")["failed"] == 1


def test_a_rig_fault_blocks_until_a_later_retry_passes(tmp_path):
    run = AllureRun(tmp_path)
    broken = {**GOOD, "esp32-download": Case("esp32", "download", "stall once", "broken")}
    results = run.run(broken)
    signoff = decide(read_results([results]))
    assert (signoff.go, signoff.decided_by) == (False, "no unexplained rig fault")
    assert "rig bench-esp32: flasher: SWD probe 000683000000 not found" in signoff.reason

    run.run({"esp32-download": GOOD["esp32-download"]})      # the re-run, into the same dir
    signoff = decide(read_results([results]))
    assert signoff.go, signoff.verdict_line()
    assert (signoff.tests, signoff.attempts) == (4, 5)
    assert counts(signoff, "esp32", "download")["passed"] == 1   # the latest attempt counts
    assert [finding.text.rsplit(" — ", 1)[1] for finding in signoff.explained] == \
        ["passed on a later retry"]


def test_a_failure_that_passes_on_retry_is_still_no_go_flaky_firmware(tmp_path):
    run = AllureRun(tmp_path)
    results = run.run({"esp32-detect": Case("esp32", "detect", "happy path", "failed")})
    run.run({"esp32-detect": Case("esp32", "detect", "happy path")})
    signoff = decide(read_results([results]))
    assert not signoff.go
    assert "(passed on a later retry: flaky)" in signoff.reason


def test_a_waiver_explains_a_rig_fault_and_an_unused_one_is_listed(tmp_path):
    cases = {**GOOD, "gd32-flash": Case("gd32", "flash", "power cut", "broken")}
    results = read_results([AllureRun(tmp_path).run(cases)])
    waivers = tmp_path / "waivers.yaml"
    waivers.write_text(
        "- test: '*gd32-flash*'\n  rig: bench-gd32\n  reason: probe cable HIL-231, replaced\n"
        "- test: test_ota#test_scenario\n  rig: bench-nrf\n  reason: not this week\n")
    signoff = decide(results, load_waivers(waivers))
    assert signoff.go, signoff.verdict_line()
    assert signoff.explained[0].text.endswith("— waived: probe cable HIL-231, replaced")
    assert [waiver.rig for waiver in signoff.unused_waivers] == ["bench-nrf"]
    # A waiver for another rig explains nothing.
    waivers.write_text("- {test: '*gd32-flash*', rig: bench-esp32, reason: elsewhere}\n")
    assert not decide(results, load_waivers(waivers)).go


def test_an_empty_results_directory_is_no_go_nothing_was_tested(tmp_path):
    empty = tmp_path / "allure-results"
    empty.mkdir()
    signoff = decide(read_results([empty]))
    assert not signoff.go
    assert signoff.verdict_line() == \
        f"NO-GO (something tested): nothing was tested: no *-result.json in {empty}"
    assert signoff.rows == ()


def test_two_hosts_merge_into_one_sign_off(tmp_path):
    host_a = AllureRun(tmp_path / "a").run({"esp32-detect": Case("esp32", "detect", "happy"),
                                            "esp32-flash": Case("esp32", "flash", "happy")})
    host_b = AllureRun(tmp_path / "b").run({"gd32-detect": Case("gd32", "detect", "happy"),
                                            "gd32-flash": Case("gd32", "flash", "happy",
                                                               "failed")})
    signoff = decide(read_results([host_a, host_b]))
    assert signoff.tests == 4
    assert signoff.directories == (str(host_a), str(host_b))
    assert [(row.board, row.phase) for row in signoff.rows] == \
        [("esp32", "detect"), ("esp32", "flash"), ("gd32", "detect"), ("gd32", "flash")]
    assert (signoff.go, signoff.decided_by) == (False, "no failed test")
    assert "gd32/flash" in signoff.reason


def test_results_of_two_builds_or_of_no_named_build_are_no_go(tmp_path):
    cases = {"esp32-detect": GOOD["esp32-detect"]}
    host_a = AllureRun(tmp_path / "a").run(cases)
    host_b = AllureRun(tmp_path / "b").run(cases, build="1.1.1+gdeadbee")
    signoff = decide(read_results([host_a, host_b]))
    assert signoff.decided_by == "one firmware build"
    assert f"results of several firmware builds: {BUILD} ({host_a}), 1.1.1+gdeadbee " \
           f"({host_b})" in signoff.reason
    unnamed = AllureRun(tmp_path / "c").run(cases, build=None)
    signoff = decide(read_results([unnamed]))
    assert signoff.reason == f"{unnamed}: names no firmware build (environment.properties " \
                             f"firmware.build)"


def test_hosts_testing_other_boards_are_one_build_but_two_packages_of_a_board_are_not(
        tmp_path):
    # package.md5 lists one package per board family, as the plugin writes it.
    esp = {"esp32-detect": GOOD["esp32-detect"]}
    host_a = AllureRun(tmp_path / "a").run(esp, package_md5="esp32=" + "a" * 32)
    host_b = AllureRun(tmp_path / "b").run(esp, package_md5="gd32=" + "b" * 32)
    assert decide(read_results([host_a, host_b])).go
    host_c = AllureRun(tmp_path / "c").run(esp, package_md5="esp32=" + "c" * 32)
    signoff = decide(read_results([host_a, host_c]))
    assert signoff.decided_by == "one firmware build"
    assert f"results of several packages for esp32: {'a' * 32} ({host_a}), {'c' * 32} " \
           f"({host_c})" in signoff.reason


def test_a_secret_in_a_failure_message_never_reaches_the_summary(tmp_path, monkeypatch):
    key = "c2VjcmV0LWFjY2Vzcy1rZXktZm9yLXRlc3Rz"
    monkeypatch.setenv("HIL_ACCESS_KEY", key)
    message = (f"fail:token phase: refused Authorization version=2022-05-01&res=products%2F1"
               f"&et=1&method=sha1&sign=QmFkU2lnbmF0dXJl key={key}")
    results = AllureRun(tmp_path).run({"esp32-token": Case("esp32", "token", "expired",
                                                           message)})
    assert key in "".join(path.read_text() for path in results.glob("*-result.json"))
    markdown, document = write(decide(read_results([results])), tmp_path / "report")
    for path in (markdown, document):
        text = path.read_text()
        assert key not in text
        assert "QmFkU2lnbmF0dXJl" not in text
        assert "sign=***" in text
        assert "key=***" in text


@pytest.mark.parametrize(("setup", "expected"), [
    (lambda d: None, "{d}/missing: no such directory (give the --alluredir of a pytest run)"),
    (lambda d: (d / "r").mkdir() or (d / "r" / "x-result.json").write_text("{\"status\":"),
     "{d}/r/x-result.json: line 1: not valid JSON"),
    (lambda d: (d / "r").mkdir() or (d / "r" / "x-result.json").write_text('{"status": "ok"}'),
     "{d}/r/x-result.json: status: 'ok' is not an Allure status (passed, failed, broken, "
     "skipped, unknown)"),
    (lambda d: (d / "r").mkdir() or (d / "w.yaml").write_text("- {test: x, rig: y}\n"),
     "{d}/w.yaml: [0].reason: Field required"),
    (lambda d: (d / "r").mkdir() or (d / "w.yaml").write_text("- {test: x, rig: y, why: z}\n"),
     "{d}/w.yaml: [0].reason: Field required (and 1 more)"),
    (lambda d: (d / "r").mkdir() or (d / "w.yaml").write_text("test: x\n"),
     "{d}/w.yaml: (top level): Input should be a valid tuple"),
], ids=["missing-dir", "bad-json", "bad-status", "waiver-no-reason", "waiver-unknown-key",
        "waiver-not-a-list"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, setup, expected):
    setup(tmp_path)
    results = tmp_path / ("missing" if "missing" in expected else "r")
    argv = ["report", str(results), "-o", str(tmp_path / "report")]
    if (tmp_path / "w.yaml").exists():
        argv += ["--waive", str(tmp_path / "w.yaml")]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == f"hil report: error: {expected.format(d=tmp_path)}\n"
    assert not (tmp_path / "report").exists()     # nothing generated for bad input


def test_a_report_dir_that_would_wipe_the_results_or_other_files_is_refused(tmp_path, capsys):
    results = tmp_path / "allure-results"
    results.mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    for output, why in ((results, "would be wiped, and it holds the results"),
                        (tmp_path, "would be wiped, and it holds the results")):
        with pytest.raises(SystemExit):
            main(["report", str(results), "-o", str(output)])
        assert why in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(["report", str(results), "-o", str(other)])
    assert "is not empty and holds no Allure report: not wiping it" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "mine"


def test_the_waiver_file_path_is_checked(tmp_path: Path):
    with pytest.raises(Exception, match=r"nope\.yaml: cannot read: No such file"):
        load_waivers(tmp_path / "nope.yaml")


# ---------------------------------------------------------------------------------- coverage
FLASH = {**GOOD, "gd32-flash": Case("gd32", "flash", "power cut", needs=("power_cut",))}


def test_a_partial_run_is_no_go_naming_the_missing_scenarios_per_board(tmp_path):
    results = AllureRun(tmp_path).run(GOOD, args=("-k", "detect"))
    signoff = decide(read_results([results]))
    assert (signoff.go, signoff.decided_by) == (False, "every scenario on every board")
    assert signoff.coverage_line() == "coverage: esp32 1/2, gd32 0/2"
    assert "esp32 1/2 ran, 1 missing: (none)/scenario[esp32-download] on esp32: rig " \
           "bench-esp32: deselected (-k, -m or --deselect)" in signoff.reason
    assert "(and 1 more)" in signoff.reason           # gd32's finding
    text = signoff.as_markdown()
    assert "(none)/scenario[gd32-flash] on gd32: rig bench-gd32: deselected" in text


def test_a_capability_skip_is_no_go_unless_another_rig_of_the_board_covers_it(tmp_path):
    results = AllureRun(tmp_path / "one").run(FLASH)
    signoff = decide(read_results([results]))
    assert not signoff.go
    assert signoff.reason == ("gd32 1/2 ran, 1 missing: (none)/scenario[gd32-flash] on gd32: "
                              "rig bench-gd32: skipped: rig bench-gd32 lacks power_cut")
    # A second gd32 rig with a bench supply runs it: the board is covered.
    covered = AllureRun(tmp_path / "two").run(FLASH, power_cut=("gd32",))
    signoff = decide(read_results([covered]))
    assert signoff.go, signoff.verdict_line()
    assert signoff.coverage_line() == "coverage: esp32 2/2, gd32 2/2"


def test_a_waiver_by_name_makes_a_missing_scenario_go_and_is_shown(tmp_path):
    results = read_results([AllureRun(tmp_path).run(FLASH)])
    waivers = tmp_path / "waivers.yaml"
    waivers.write_text("- {test: '*gd32-flash*', board: gd32, reason: no supply "
                       "on the gd32 bench until HIL-240}\n")
    signoff = decide(results, load_waivers(waivers))
    assert signoff.go, signoff.verdict_line()
    assert signoff.coverage_line() == "coverage: esp32 2/2, gd32 1/2 (+1 waived)"
    assert signoff.unused_waivers == ()
    assert "— waived: no supply on the gd32 bench until HIL-240" in signoff.as_markdown()
    assert signoff.environment()["waiver 1"] == \
        "*gd32-flash* on board gd32: no supply on the gd32 bench until HIL-240"
    # The old form {test, rig, reason} names it too; a waiver for another board does not.
    waivers.write_text("- {test: 'test_ota#test_scenario', rig: bench-gd32, reason: known}\n")
    assert decide(results, load_waivers(waivers)).go
    waivers.write_text("- {test: '*gd32-flash*', board: esp32, reason: elsewhere}\n")
    assert not decide(results, load_waivers(waivers)).go


def test_results_without_a_coverage_file_are_no_go_coverage_unknown(tmp_path):
    results = AllureRun(tmp_path).run(GOOD)
    for path in results.glob("*-hil-coverage.json"):     # as a plain allure-pytest run leaves
        path.unlink()
    signoff = decide(read_results([results]))
    assert (signoff.go, signoff.decided_by) == (False, "every scenario on every board")
    assert signoff.reason.startswith(f"coverage unknown: {results} has test results but no "
                                     "hil coverage file")
    assert signoff.coverage_line() == "coverage: unknown (no hil coverage file)"


def test_a_re_run_into_the_same_directory_adds_to_the_coverage(tmp_path):
    run = AllureRun(tmp_path)
    results = run.run(GOOD, args=("-k", "esp32"))
    assert not decide(read_results([results])).go
    run.run(GOOD, args=("-k", "gd32"))
    signoff = decide(read_results([results]))
    assert signoff.go, signoff.verdict_line()
    assert signoff.coverage_line() == "coverage: esp32 2/2, gd32 2/2"
