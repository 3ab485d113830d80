"""The example CI pipelines for a lab shared through labgrid (ci-examples/*-labgrid.yml): jobs
pinned to no lab host, each reserving places from the coordinator by tags.

As in tests/test_ci_examples.py, each file is read into one shape (a job per board family, its
matrix values substituted as the CI would) and each job's commands run for real by bash with
the tools stubbed (``python3``, ``hil``, ``pytest``, ``labgrid-client``), which shows the
order, the arguments and what fails the job. The options the pytest command gives are checked
against the plugin's own (``pytest --help``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_ci_examples import FAKE_SECRET, KEY_NAME, STUB, _github_expand, options_of

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "ci-examples"
TOOLS = {"stubs": ["python3"], ".venv/bin": ["hil", "pytest"],
         ".venv-labgrid/bin": ["labgrid-client"]}


@dataclass
class FamilyJob:
    board: str
    workers: str
    labels: list[str]          # runner tags / runs-on labels
    env: dict[str, str]
    scripts: list[str]         # each by its own bash, in order; the first failure ends the job
    uploads: list[tuple[str, bool]]


@dataclass
class Pipeline:
    jobs: list[FamilyJob]
    signoff: dict[str, Any]
    text: str


def read_gitlab(path: Path) -> Pipeline:
    text = path.read_text()
    document = yaml.safe_load(text)
    top = {name: str(v["value"] if isinstance(v, dict) else v)
           for name, v in document["variables"].items()}
    job = document["conformance"]
    jobs = []
    for entry in job["parallel"]["matrix"]:
        env = {**top, **{k: str(v) for k, v in entry.items()}, KEY_NAME: FAKE_SECRET}

        def expand(value: str, env: dict[str, str] = env) -> str:
            return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), value)
        artifacts = job["artifacts"]
        jobs.append(FamilyJob(entry["BOARD"], str(entry["WORKERS"]), job["tags"], env,
                              ["\n".join(job["script"])],
                              [(expand(p).rstrip("/"), artifacts.get("when") == "always")
                               for p in artifacts["paths"]]))
    signoff = document["signoff"]
    return Pipeline(jobs, {"needs": signoff["needs"], "always": signoff.get("when") == "always",
                           "script": "\n".join(signoff["script"])}, text)


def read_github(path: Path) -> Pipeline:
    text = path.read_text()
    document = yaml.safe_load(text)
    triggers = document.get("on", document.get(True))     # YAML 1.1 reads `on` as true
    inputs = {name: str(spec.get("default", ""))
              for name, spec in triggers["workflow_dispatch"]["inputs"].items()}
    job = document["jobs"]["conformance"]
    jobs = []
    for entry in job["strategy"]["matrix"]["include"]:
        contexts = {"matrix": {k: str(v) for k, v in entry.items()}, "inputs": inputs,
                    "secrets": {KEY_NAME: FAKE_SECRET}}
        env = {name: _github_expand(str(value), contexts)
               for name, value in [*document["env"].items(), *job["env"].items()]}
        steps = job["steps"]
        jobs.append(FamilyJob(
            entry["board"], str(entry["workers"]), job["runs-on"], env,
            [step["run"] for step in steps if "run" in step],
            [(_github_expand(step["with"]["path"], contexts), step.get("if") == "always()")
             for step in steps if str(step.get("uses", "")).startswith(
                 "actions/upload-artifact")]))
    signoff = document["jobs"]["signoff"]
    return Pipeline(jobs, {"needs": [signoff["needs"]], "always": signoff.get("if") == "always()",
                           "script": "\n".join(s["run"] for s in signoff["steps"] if "run" in s)},
                    text)


PIPELINES = {"gitlab": lambda: read_gitlab(EXAMPLES / "gitlab-ci-labgrid.yml"),
             "github": lambda: read_github(EXAMPLES / "github-actions-labgrid.yml")}


@pytest.fixture(params=sorted(PIPELINES))
def pipeline(request: pytest.FixtureRequest) -> Pipeline:
    return PIPELINES[request.param]()


def dry_run(job: FamilyJob, workdir: Path, **exits: int) -> tuple[bool, list[list[str]]]:
    """The job's scripts run by bash in ``workdir``, its tools stubbed; ``exits`` sets what a
    stub exits with (``pytest=1``). Whether the job passed, and the tools' calls in order."""
    for directory, tools in TOOLS.items():
        (workdir / directory).mkdir(parents=True, exist_ok=True)
        for tool in tools:
            stub = workdir / directory / tool
            stub.write_text(STUB.format(tool=tool.replace("-", "_")))
            stub.chmod(0o755)
    log = workdir / "calls.log"
    log.write_text("")
    env = {**job.env, "PATH": f"{workdir / 'stubs'}{os.pathsep}{os.environ['PATH']}",
           "STUB_LOG": str(log), **{f"STUB_EXIT_{tool}": str(code) for tool, code in exits.items()}}
    ok = True
    for script in job.scripts:
        done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
                              cwd=workdir, env=env, capture_output=True, text=True, timeout=30,
                              check=False)
        if done.returncode != 0:
            ok = False
            break
    return ok, [line.split("\t") for line in log.read_text().splitlines()]


def test_the_jobs_are_pinned_to_no_lab_host_and_reach_the_coordinator(pipeline: Pipeline) -> None:
    assert len(pipeline.jobs) >= 2
    for job in pipeline.jobs:
        # The same runners for every family: any that reaches the coordinator.
        assert job.labels == pipeline.jobs[0].labels
        assert not any("$" in label or job.board in label for label in job.labels)
        assert re.fullmatch(r"[\w.-]+:\d+", job.env["LG_COORDINATOR"])


def test_a_job_lists_the_places_then_runs_the_suite_on_places_of_its_family(
        pipeline: Pipeline, tmp_path: Path) -> None:
    for job in pipeline.jobs:
        ok, calls = dry_run(job, tmp_path / job.board)
        assert ok
        assert [call[0] for call in calls] == ["python3", "labgrid_client", "labgrid_client",
                                               "pytest"]
        assert calls[0][1:] == ["dev.py", "setup"]
        args = calls[-1][1:]
        assert args[0] == "testcases"
        options = options_of(args)
        assert options["-n"] == [job.workers]
        assert options["--hil-place-tags"] == [f"board={job.board}"]
        assert "--hil-check-rigs" in args
        assert "--hil-rig" not in options          # the rig is the place's
        assert options["--alluredir"] == [f"allure-results/{job.board}"]
        assert job.uploads == [(f"allure-results/{job.board}", True)]


def test_failed_tests_go_to_the_sign_off_but_a_lab_that_does_not_answer_fails_the_job(
        pipeline: Pipeline, tmp_path: Path) -> None:
    job = pipeline.jobs[0]
    assert dry_run(job, tmp_path / "a", pytest=1)[0]
    assert not dry_run(job, tmp_path / "b", pytest=4)[0]
    ok, calls = dry_run(job, tmp_path / "c", labgrid_client=1)
    assert not ok
    assert "pytest" not in [call[0] for call in calls]


def test_the_sign_off_merges_every_familys_results(pipeline: Pipeline) -> None:
    assert pipeline.signoff["needs"] == ["conformance"]
    assert pipeline.signoff["always"]
    assert ".venv/bin/hil report allure-results/* -o allure-report" in pipeline.signoff["script"]


def test_both_examples_describe_the_same_lab() -> None:
    gitlab, github = (PIPELINES[name]() for name in ("gitlab", "github"))
    assert [(j.board, j.workers) for j in gitlab.jobs] == \
        [(j.board, j.workers) for j in github.jobs]
    assert gitlab.jobs[0].env["LG_COORDINATOR"] == github.jobs[0].env["LG_COORDINATOR"]


def test_no_secret_is_written_into_the_pipelines(pipeline: Pipeline) -> None:
    assert FAKE_SECRET not in pipeline.text
    assert re.findall(rf"{KEY_NAME}: (.+)", pipeline.text) in (
        [], ["${{ secrets.HIL_ACCESS_KEY }}"])


def test_the_options_the_jobs_give_are_the_plugins() -> None:
    given = {word for name in PIPELINES for job in PIPELINES[name]().jobs
             for script in job.scripts for word in script.split() if word.startswith("--hil-")}
    assert {"--hil-place-tags", "--hil-check-rigs"} <= given
    helped = subprocess.run([sys.executable, "-m", "pytest", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=True).stdout
    assert not [option for option in given if option not in helped]
