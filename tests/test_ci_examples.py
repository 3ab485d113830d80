"""The example CI pipelines (ci-examples/): what each job runs, in what order, with what, and
that the sign-off job's own ``hil report`` command merges real results into one verdict.

Each file is read into the same shape (``Pipeline``: one ``HostJob`` per lab host, with its
matrix values substituted as the CI would, and the sign-off ``MergeJob``), so one set of checks
serves both. A host job's commands are run for real by bash, as the CI runs them (``-eo
pipefail``), with ``python3``, ``hil`` and ``pytest`` replaced by stubs that log their arguments:
that shows the order (rigs check before pytest), the arguments (``--hil-rig`` per rig, the
build, ``--alluredir`` per host) and what fails the job. The sign-off command runs unchanged
in a temporary directory laid out as the CI leaves it after downloading the artifacts, with the
real hil and the real Allure generator, over two real allure-pytest runs (``AllureRun``).
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from allure_runs import AllureRun, Case

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "ci-examples"
KEY_NAME = "HIL_ACCESS_KEY"
FAKE_SECRET = "c2VjcmV0LW9mLXRoZS1jaQ=="       # what the CI would put in the environment


@dataclass
class HostJob:
    host: str
    labels: list[str]                   # runner tags (GitLab) or runs-on labels (GitHub)
    env: dict[str, str]                 # what the job's shell sees
    scripts: list[str]                  # each run by its own bash, in order; the first failure ends
    uploads: list[tuple[str, bool]]     # (path, even when the job failed)
    artifact: str                       # the name the results are uploaded under


@dataclass
class MergeJob:
    needs: list[str]
    always: bool                        # runs whatever the host jobs ended with
    scripts: list[str]
    downloads: str                      # where host ``h``'s results land: a pattern with {host}
    uploads: list[tuple[str, bool]]
    may_fail: bool                      # allow_failure / continue-on-error: the gate ignored


@dataclass
class Pipeline:
    name: str
    host_job: str                       # the job (matrix) every host runs
    hosts: list[HostJob]
    merge: MergeJob
    text: str = field(repr=False)


# ------------------------------------------------------------------------------ reading them
def _gitlab_expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), value)


def _matrix_entries(matrix: list[dict[str, Any]]) -> Iterator[dict[str, str]]:
    """GitLab's parallel:matrix: each entry's list values multiply out."""
    for entry in matrix:
        names = list(entry)
        values = [v if isinstance(v, list) else [v] for v in entry.values()]
        for combination in itertools.product(*values):
            yield {name: str(value) for name, value in zip(names, combination, strict=True)}


def read_gitlab(path: Path) -> Pipeline:
    text = path.read_text()
    document = yaml.safe_load(text)
    top = {name: str(v["value"] if isinstance(v, dict) else v)
           for name, v in document.get("variables", {}).items()}
    host_name, host_job = next((name, job) for name, job in document.items()
                               if isinstance(job, dict) and "parallel" in job)
    hosts = []
    for entry in _matrix_entries(host_job["parallel"]["matrix"]):
        env = {**top, **{k: str(v) for k, v in host_job.get("variables", {}).items()}, **entry,
               "CI_JOB_NAME": host_name, KEY_NAME: FAKE_SECRET}
        artifacts = host_job.get("artifacts", {})
        lines = [*host_job.get("before_script", []), *host_job["script"]]
        hosts.append(HostJob(
            host=entry["HOST"], labels=[_gitlab_expand(t, env) for t in host_job["tags"]],
            env=env, scripts=["\n".join(lines)],
            uploads=[(_gitlab_expand(p, env).rstrip("/"), artifacts.get("when") == "always")
                     for p in artifacts.get("paths", [])],
            artifact=_gitlab_expand(artifacts.get("name", ""), env)))
    merge_job = document["signoff"]
    artifacts = merge_job.get("artifacts", {})
    merge = MergeJob(
        needs=[n if isinstance(n, str) else n["job"] for n in merge_job.get("needs", [])],
        always=merge_job.get("when") == "always",
        scripts=["\n".join([*merge_job.get("before_script", []), *merge_job["script"]])],
        # GitLab extracts each needed job's artifacts at the paths they were uploaded from.
        downloads="{upload}",
        uploads=[(p.rstrip("/"), artifacts.get("when") == "always")
                 for p in artifacts.get("paths", [])],
        may_fail=bool(merge_job.get("allow_failure")))
    return Pipeline("gitlab", host_name, hosts, merge, text)


def _github_expand(value: str, contexts: dict[str, dict[str, str]]) -> str:
    def one(match: re.Match[str]) -> str:
        context, name = match.group(1), match.group(2)
        return contexts[context][name]
    return re.sub(r"\$\{\{\s*(\w+)\.([\w-]+)\s*\}\}", one, value)


def read_github(path: Path) -> Pipeline:
    text = path.read_text()
    document = yaml.safe_load(text)
    triggers = document.get("on", document.get(True))     # YAML 1.1 reads `on` as true
    inputs = {name: str(spec.get("default", ""))
              for name, spec in triggers["workflow_dispatch"]["inputs"].items()}
    jobs = document["jobs"]
    host_name, host_job = next((name, job) for name, job in jobs.items()
                               if "matrix" in job.get("strategy", {}))
    hosts = []
    for entry in host_job["strategy"]["matrix"]["include"]:
        contexts = {"matrix": {k: str(v) for k, v in entry.items()}, "inputs": inputs,
                    "secrets": {KEY_NAME: FAKE_SECRET}}
        env = {name: _github_expand(str(value), contexts) for name, value in
               [*document.get("env", {}).items(), *host_job.get("env", {}).items()]}
        steps = host_job["steps"]
        uploads = [(_github_expand(step["with"]["path"], contexts), step.get("if") == "always()",
                    _github_expand(step["with"]["name"], contexts))
                   for step in steps if str(step.get("uses", "")).startswith(
                       "actions/upload-artifact@")]
        hosts.append(HostJob(
            host=entry["host"], labels=[_github_expand(label, contexts)
                                        for label in host_job["runs-on"]],
            env=env, scripts=[step["run"] for step in steps if "run" in step],
            uploads=[(p, always) for p, always, _ in uploads],
            artifact=uploads[0][2] if uploads else ""))
    merge_job = jobs["signoff"]
    needs = merge_job.get("needs", [])
    download = next(step["with"] for step in merge_job["steps"]
                    if str(step.get("uses", "")).startswith("actions/download-artifact@"))
    assert not download.get("merge-multiple"), "each host's results must stay in its directory"
    merge = MergeJob(
        needs=[needs] if isinstance(needs, str) else list(needs),
        always=merge_job.get("if") == "always()",
        scripts=[step["run"] for step in merge_job["steps"] if "run" in step],
        # download-artifact puts each artifact the pattern matches in <path>/<artifact name>;
        # {artifact} is filled in per host, and the pattern checked to match it.
        downloads=f"{download['path']}/{{artifact}}|{download['pattern']}",
        uploads=[(step["with"]["path"], step.get("if") == "always()")
                 for step in merge_job["steps"]
                 if str(step.get("uses", "")).startswith("actions/upload-artifact@")],
        may_fail=bool(merge_job.get("continue-on-error"))
        or any(step.get("continue-on-error") for step in merge_job["steps"]))
    return Pipeline("github", host_name, hosts, merge, text)


PIPELINES = {"gitlab": lambda: read_gitlab(EXAMPLES / "gitlab-ci.yml"),
             "github": lambda: read_github(EXAMPLES / "github-actions.yml")}


@pytest.fixture(params=sorted(PIPELINES))
def pipeline(request: pytest.FixtureRequest) -> Pipeline:
    return PIPELINES[request.param]()


def results_dir_of(pipeline: Pipeline, host: HostJob) -> str:
    """Where the sign-off job finds ``host``'s results once it has downloaded them."""
    if pipeline.merge.downloads == "{upload}":
        return host.uploads[0][0]
    where, pattern = pipeline.merge.downloads.split("|")
    assert fnmatch.fnmatchcase(host.artifact, pattern), (host.artifact, pattern)
    return where.format(artifact=host.artifact)


# ------------------------------------------------------------------------------ dry runs
STUB = """#!/bin/sh
{{ printf '%s' "{tool}"; for arg in "$@"; do printf '\\t%s' "$arg"; done; echo; }} >> "$STUB_LOG"
exit "${{STUB_EXIT_{tool}:-0}}"
"""


@dataclass
class DryRun:
    ok: bool
    calls: list[list[str]]
    output: str


def dry_run(job: HostJob, workdir: Path, **exits: int) -> DryRun:
    """The job's scripts run by bash in ``workdir``, its tools stubbed; ``exits`` sets what a
    stub exits with (``pytest=1``)."""
    if workdir.exists():
        shutil.rmtree(workdir)
    stubs = workdir / "stubs"
    venv_bin = workdir / ".venv" / "bin"
    for directory, tool in ((stubs, "python3"), (venv_bin, "hil"), (venv_bin, "pytest")):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / tool).write_text(STUB.format(tool=tool))
        (directory / tool).chmod(0o755)
    log = workdir / "calls.log"
    log.touch()
    env = {**job.env, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}",
           "STUB_LOG": str(log), **{f"STUB_EXIT_{tool}": str(code) for tool, code in exits.items()}}
    output, ok = "", True
    for script in job.scripts:
        done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
                              cwd=workdir, env=env, capture_output=True, text=True, timeout=30,
                              check=False)
        output += done.stdout + done.stderr
        if done.returncode != 0:
            ok = False
            break
    calls = [line.split("\t") for line in log.read_text().splitlines()]
    return DryRun(ok, calls, output)


def options_of(args: list[str]) -> dict[str, list[str]]:
    """``--name value`` and ``-n value`` pairs of a command line, repeats kept in order."""
    found: dict[str, list[str]] = {}
    for name, value in itertools.pairwise(args):
        if name.startswith("-") and not value.startswith("-"):
            found.setdefault(name, []).append(value)
    return found


# ------------------------------------------------------------------------------ the host jobs
def test_one_job_per_lab_host_on_that_hosts_runner(pipeline):
    hosts = [job.host for job in pipeline.hosts]
    assert len(hosts) >= 2, "an example with one host shows no merge"
    assert len(set(hosts)) == len(hosts), hosts
    for job in pipeline.hosts:
        assert job.host in job.labels, (job.host, job.labels)     # the host's own runner
        if pipeline.name == "github":
            assert job.labels[0] == "self-hosted"
    rigs = [rig for job in pipeline.hosts for rig in job.env["RIGS"].split()]
    assert len(set(rigs)) == len(rigs), f"a rig on two hosts: {rigs}"


def test_both_examples_describe_the_same_lab():
    def lab(pipeline: Pipeline) -> dict[str, tuple[str, str]]:
        return {job.host: (job.env["RIGS"], job.env["WORKERS"]) for job in pipeline.hosts}
    gitlab, github = (read() for read in (PIPELINES["gitlab"], PIPELINES["github"]))
    assert lab(gitlab) == lab(github)
    assert {name: gitlab.hosts[0].env[name] for name in ("FIRMWARE", "PACKAGE", "TARGET")} == \
        {name: github.hosts[0].env[name] for name in ("FIRMWARE", "PACKAGE", "TARGET")}


def test_a_host_job_sets_up_checks_its_rigs_then_runs_the_suite_into_its_own_results(
        pipeline, tmp_path):
    for job in pipeline.hosts:
        rigs = job.env["RIGS"].split()
        run = dry_run(job, tmp_path / job.host)
        assert run.ok, run.output
        assert [call[:3] for call in run.calls] == [
            ["python3", "dev.py", "setup"], ["hil", "rigs", "check"], ["pytest", "testcases",
                                                                       "-n"]], run.calls
        assert run.calls[1][3:] == rigs
        pytest_args = run.calls[2][1:]
        options = options_of(pytest_args)
        assert options["-n"] == [str(len(rigs))]       # one worker per rig
        assert options["--dist"] == ["loadgroup"]
        assert options["--hil-rig"] == rigs
        assert options["--hil-firmware"] == [job.env["FIRMWARE"]]
        assert options["--hil-package"] == [job.env["PACKAGE"]]
        assert options["--hil-target-version"] == [job.env["TARGET"]]
        assert options["--alluredir"] == [f"allure-results/{job.host}"]
        # ... and exactly those results are uploaded, also when the job failed.
        assert job.uploads == [(f"allure-results/{job.host}", True)], job.uploads


def test_failed_tests_go_to_the_sign_off_but_a_suite_that_did_not_run_fails_the_job(
        pipeline, tmp_path):
    job = pipeline.hosts[0]
    failed_tests = dry_run(job, tmp_path / "failed", pytest=1)
    assert failed_tests.ok, failed_tests.output
    for status in (2, 3, 4, 5):           # interrupted, internal error, usage error, no tests
        assert not dry_run(job, tmp_path / f"status-{status}", pytest=status).ok, status
    rig_down = dry_run(job, tmp_path / "rig-down", hil=1)
    assert not rig_down.ok
    assert [call[0] for call in rig_down.calls] == ["python3", "hil"]     # no test ran


# ------------------------------------------------------------------------------ the sign-off job
def test_the_sign_off_job_needs_every_host_job_runs_anyway_and_gates_on_its_verdict(pipeline):
    merge = pipeline.merge
    assert merge.needs == [pipeline.host_job]          # the matrix: every host
    assert merge.always
    assert not merge.may_fail
    commands = report_commands(pipeline)
    assert len(commands) == 1, commands
    for hides_the_status in ("||", ";", "&&"):
        assert hides_the_status not in commands[0], "the verdict must be the job's status"
    args = shlex.split(commands[0])
    assert args[:2] == [".venv/bin/hil", "report"]
    output = options_of(args)
    assert output["-o"] == ["allure-report"]
    inputs = [arg for arg in args[2:] if arg not in ("-o", "allure-report")]
    for job in pipeline.hosts:        # every host's results are among the inputs
        where = results_dir_of(pipeline, job)
        assert any(fnmatch.fnmatchcase(where, pattern) for pattern in inputs), (where, inputs)
    assert merge.uploads == [("allure-report", True)]
    assert merge.scripts[-1].strip().splitlines()[-1] == commands[0], \
        "the report is the job's last command: its exit status is the job's"


def report_commands(pipeline: Pipeline) -> list[str]:
    return [line.strip() for script in pipeline.merge.scripts for line in script.splitlines()
            if re.match(r"\s*\S*hil report\b", line)]


def test_no_secret_is_written_into_the_pipelines(pipeline):
    text = pipeline.text
    assert not re.search(r"[A-Za-z0-9+/]{32,}={0,2}", text), "something like a key is in it"
    assert "--access-key" not in text
    if pipeline.name == "gitlab":
        document = yaml.safe_load(text)
        variables = [document.get("variables", {})] + [
            job.get("variables", {}) for job in document.values() if isinstance(job, dict)]
        assert all(KEY_NAME not in v for v in variables), "the key is a CI/CD variable"
    else:
        assigned = re.findall(rf"{KEY_NAME}\s*:\s*(.+)", text)
        assert assigned == ["${{ secrets.HIL_ACCESS_KEY }}"], assigned
        assert all(job.env[KEY_NAME] == FAKE_SECRET for job in pipeline.hosts)


# ------------------------------------------------------------------------------ the merge, for real
@pytest.fixture(scope="module")
def host_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real allure-pytest results of two hosts, and a failing run of the second."""
    base = tmp_path_factory.mktemp("hosts")
    return {
        "a": AllureRun(base / "a").run({"esp32-detect": Case("esp32", "detect", "happy path"),
                                        "esp32-flash": Case("esp32", "flash", "happy path")}),
        "b": AllureRun(base / "b").run({"gd32-download": Case("gd32", "download", "stall"),
                                        "gd32-report": Case("gd32", "report", "happy path")}),
        "b-failed": AllureRun(base / "b-failed").run(
            {"gd32-download": Case("gd32", "download", "stall", "failed"),
             "gd32-report": Case("gd32", "report", "happy path")}),
    }


def run_sign_off(pipeline: Pipeline, workdir: Path, results: list[Path]
                 ) -> subprocess.CompletedProcess[str]:
    """The sign-off job's report command, unchanged, in ``workdir`` laid out as the job finds
    it: the project's .venv, each host's results where the download put them."""
    workdir.mkdir()
    (workdir / ".venv").symlink_to(ROOT / ".venv")
    for job, directory in zip(pipeline.hosts, results, strict=True):
        shutil.copytree(directory, workdir / results_dir_of(pipeline, job))
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith(("PYTEST_", KEY_NAME))}
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c",
                           report_commands(pipeline)[0]], cwd=workdir, env=environment,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_the_sign_off_command_merges_every_hosts_results_into_one_report_and_go(
        pipeline, host_results, tmp_path):
    assert len(pipeline.hosts) == 2, "the example's two hosts get one real run each"
    done = run_sign_off(pipeline, tmp_path / "job", [host_results["a"], host_results["b"]])
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("GO "), done.stdout
    report = tmp_path / "job" / "allure-report"
    assert (report / "index.html").is_file()
    signoff = json.loads((report / "signoff.json").read_text())
    assert signoff["verdict"] == "GO"
    assert signoff["results"] == [results_dir_of(pipeline, job) for job in pipeline.hosts]
    assert signoff["tests"] == 4
    assert {(row["board"], row["phase"]) for row in signoff["boards_x_phases"]} == {
        ("esp32", "detect"), ("esp32", "flash"), ("gd32", "download"), ("gd32", "report")}
    assert (report / "signoff.md").is_file()


@pytest.mark.slow
def test_a_failed_test_on_one_host_makes_the_sign_off_job_fail_with_no_go(host_results,
                                                                         tmp_path):
    pipeline = PIPELINES["gitlab"]()
    done = run_sign_off(pipeline, tmp_path / "job", [host_results["a"], host_results["b-failed"]])
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("NO-GO (no failed test)"), done.stdout
    signoff = json.loads((tmp_path / "job" / "allure-report" / "signoff.json").read_text())
    assert signoff["verdict"] == "NO-GO"
