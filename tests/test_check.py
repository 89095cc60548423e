"""`lugh check`: the first-party plugins and a fresh project pass; each kind of
problem is reported on its own line, later checks are skipped, and the exit status
says whether the project is ready to publish."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lugh_sdk import firstparty, scaffold
from lugh_sdk.check import check_project
from lugh_sdk.errors import LughError


def statuses(report) -> dict[str, str]:
    return {item.name: item.status for item in report.items}


@pytest.mark.parametrize("name", firstparty.FIRST_PARTY)
def test_every_first_party_plugin_passes(name):
    # Their conformance suites run in test_harness.py; here, everything up to it.
    report = check_project(firstparty.plugins_source() / name, conformance=False)
    assert report.ok, [i for i in report.items if i.status == "failed"]
    assert [(i.name, i.status) for i in report.items] == [
        ("pyproject.toml", "passed"), ("entry point", "passed"), ("manifest", "passed"),
        ("manifest matches pyproject.toml", "passed"), ("compatible", "passed"), ("wheel", "passed"),
        ("loads in the service host", "passed"), ("hooks", "passed"), ("conformance", "skipped")]


@pytest.fixture
def sched(tmp_path) -> Path:
    return scaffold.new_project("scheduler", "acme-sched", vendor="acme", directory=tmp_path / "acme-sched")


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_a_manifest_that_disagrees_with_pyproject_is_refused_before_building(sched):
    edit(sched / "acme_sched" / "lugh-plugin.toml", 'version = "0.1.0"', 'version = "0.2.0"')
    report = check_project(sched)
    assert not report.ok
    failed = report.failed
    assert [i.name for i in failed] == ["manifest matches pyproject.toml"]
    assert "version: manifest '0.2.0', pyproject.toml '0.1.0'" in failed[0].detail
    assert statuses(report)["wheel"] == "skipped" and report.wheel is None


def test_a_missing_manifest_and_a_missing_entry_point_are_named(sched):
    (sched / "acme_sched" / "lugh-plugin.toml").unlink()
    assert "no manifest at acme_sched/lugh-plugin.toml" in check_project(sched).failed[0].detail
    edit(sched / "pyproject.toml", '[project.entry-points."lugh.plugins"]\nacme-sched = "acme_sched.plugin:AcmeSched"\n', "")
    report = check_project(sched)
    assert [i.name for i in report.failed] == ["entry point"] and "found 0" in report.failed[0].detail


@pytest.mark.parametrize("file, old, new, failed, message", [
    ("lugh-plugin.toml", f'api = "{scaffold.api_range()}"', 'api = ">=7.0,<8"', "compatible",
     "needs plugin API >=7.0,<8; this kernel provides"),
    ("plugin.py", "        return round(job.deadline - job.release, 9)\n",
     "        return round(job.deadline - job.release, 9)\n\n    def sched_health(self):\n        return True\n",
     "hooks", "sched_health defined without @hookimpl"),
    ("plugin.py", "from lugh_sdk.api import Job\n", "from lugh_sdk.api import Job\n\nraise RuntimeError('no config file')\n",
     "loads in the service host", "importing the plugin failed: RuntimeError: no config file"),
], ids=["api-range", "unmarked-hook", "import-error"])
def test_each_problem_fails_its_own_check_and_skips_the_rest(sched, file, old, new, failed, message):
    edit(sched / "acme_sched" / file, old, new)
    report = check_project(sched)
    assert [i.name for i in report.failed] == [failed]
    assert message in report.failed[0].detail
    after = [i.status for i in report.items][[i.name for i in report.items].index(failed) + 1:]
    assert after and set(after) == {"skipped"}


def test_a_conformance_failure_fails_the_check_through_the_cli(sched):
    edit(sched / "acme_sched" / "plugin.py", "        return round(job.deadline - job.release, 9)\n",
         "        import random\n        return random.random()\n")
    proc = subprocess.run([sys.executable, "-m", "lugh_sdk", "check", str(sched), "--json"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert not report["ok"] and (report["name"], report["kind"]) == ("acme-sched", "scheduler")
    failed = {c["name"]: c["detail"] for c in report["checks"] if c["status"] == "failed"}
    assert "two runs of the same workload differ" in failed["conformance: deterministic"]


def test_the_cli_prints_a_table_and_exits_0_when_ready(sched):
    proc = subprocess.run([sys.executable, "-m", "lugh_sdk", "check"], cwd=sched, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "loads in the service host" in proc.stdout and "conformance: state-round-trip" in proc.stdout
    assert "0 failed" in proc.stdout and "ready to publish" in proc.stdout


def test_a_directory_that_is_no_project_is_a_clear_error(tmp_path):
    with pytest.raises(LughError, match="no pyproject.toml"):
        check_project(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "lugh_sdk", "check", str(tmp_path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "is not a plugin project" in proc.stderr and "Traceback" not in proc.stderr
