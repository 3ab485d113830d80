"""hil's pytest plugin end to end: a test project using its fixtures, run by pytester."""

import json

TEST_MODULE = """
import requests

def detect(onenet, version="1.0.0"):
    return requests.get(f"{onenet.url}/ota/south/check",
                        params={"dev_id": "42", "type": 2, "version": version, "cdn": "true"},
                        headers={"Authorization": onenet.authorization()}, timeout=5).json()

def test_first_sees_its_task(mock_onenet):
    mock_onenet.service.create_task("42", "2.0.0", b"x" * 10)
    assert detect(mock_onenet)["errno"] == 0

def test_second_starts_empty(mock_onenet):
    assert len(mock_onenet.timeline) == 0
    assert detect(mock_onenet)["errno"] == 1   # the device of the first test is gone

def test_a_crash_on_the_server_thread_fails_the_test(mock_onenet):
    mock_onenet.service.create_task("42", "2.0.0", b"x" * 10)
    def boom(*args):
        raise RuntimeError("handler bug")
    mock_onenet.service._detect = boom
    assert detect(mock_onenet)["errno"] == 7   # the device still gets an answer
"""


def test_fixtures_isolate_tests_and_surface_server_crashes(pytester):
    pytester.makepyfile(test_project=TEST_MODULE)
    timeline_dir = pytester.path / "timelines"
    result = pytester.runpytest_subprocess("--hil-timeline-dir", str(timeline_dir), "-p",
                                           "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*ServiceCrashed: 1 request(s) crashed the mock service*"])
    lines = (timeline_dir / "mock-onenet.timeline.jsonl").read_text().splitlines()
    assert [json.loads(line)["errno"] for line in lines] == [0, 1, 7]


def test_options_are_in_the_hil_group_with_ini_twins(pytester):
    result = pytester.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(["hil: hardware-in-the-loop OTA testing:",
                                 "*--hil-timeline-dir*", "*hil_timeline_dir*"])
