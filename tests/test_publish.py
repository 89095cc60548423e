"""`lugh build` and `lugh publish`: build with poetry-core, publish only what passes
every check, build again only when the sources changed, never replace a published
version, and say clearly why nothing was published."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lugh_sdk import release, scaffold
from lugh_sdk.errors import LughError


def lugh(*args: str, home: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lugh_sdk", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "LUGH_HOME": str(home)})


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def mon(tmp_path) -> Path:
    return scaffold.new_project("monitor", "acme-watch", vendor="acme", directory=tmp_path / "acme-watch")


def bump(project: Path, version: str) -> None:
    for file in (project / "pyproject.toml", project / "acme_watch" / "lugh-plugin.toml"):
        file.write_text(file.read_text().replace('version = "0.1.0"', f'version = "{version}"'))


def test_build_then_publish_then_refuse_to_overwrite(mon, home):
    built = lugh("build", "--json", home=home, cwd=mon)
    assert built.returncode == 0, built.stderr
    wheel = Path(json.loads(built.stdout)["wheel"])
    assert wheel == mon / "dist" / "acme_watch-0.1.0-py3-none-any.whl" and wheel.is_file()

    first = lugh("publish", "--json", home=home, cwd=mon)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert (out["name"], out["version"], out["kind"], out["vendor"], out["published"]) == \
        ("acme-watch", "0.1.0", "monitor", "acme", True)
    assert out["built"] is False  # the wheel of `lugh build` was current
    assert out["registry"] == str(home / "registry") and (home / "keys" / "acme.key").stat().st_mode & 0o077 == 0
    published = list((home / "registry" / "targets" / "acme-watch").glob("*.whl"))
    assert [p.read_bytes() for p in published] == [wheel.read_bytes()]

    before = tree(home / "registry")
    again = lugh("publish", home=home, cwd=mon)
    assert again.returncode == 1
    assert "acme-watch 0.1.0 is already published" in again.stderr and "Traceback" not in again.stderr
    assert tree(home / "registry") == before


def test_publish_builds_again_only_when_the_sources_changed(mon, home):
    first = release.publish(mon, home=home)
    assert first["built"] is True and first["version"] == "0.1.0"
    plugin = mon / "acme_watch" / "plugin.py"
    plugin.write_text(plugin.read_text().replace("RECENT = 10", "RECENT = 12"))
    (mon / "tests" / "notes.txt").write_text("tests do not go into the wheel")
    with pytest.raises(LughError, match="already published"):
        release.publish(mon, home=home)
    assert release.ensure_built(release.projects.read_project(mon))[1] is False  # that refusal built it anew
    bump(mon, "0.2.0")
    second = release.publish(mon, home=home)
    assert (second["version"], second["built"]) == ("0.2.0", True)
    assert second["sha256"] != first["sha256"]


def test_a_project_failing_its_checks_is_not_published(mon, home):
    plugin = mon / "acme_watch" / "plugin.py"
    plugin.write_text(plugin.read_text().replace("        self.events[kind] += 1\n",
                                                 "        self.events[kind] += 1\n        data['task']\n"))
    with pytest.raises(release.ChecksFailed, match=r"not published: 1 check\(s\) failed") as refused:
        release.publish(mon, home=home)
    assert "conformance: unknown-events-ignored" in str(refused.value)
    assert not (home / "registry").exists()
    cli = lugh("publish", home=home, cwd=mon)
    assert cli.returncode == 1 and "not published" in cli.stderr and "unknown-events-ignored" in cli.stdout


def test_publish_needs_a_vendor_and_an_existing_key_for_another_registry(mon, home, tmp_path):
    pyproject = mon / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('[tool.lugh]\nvendor = "acme"\n', ""))
    with pytest.raises(LughError, match=r"no vendor: pass --vendor"):
        release.publish(mon, home=home)
    with pytest.raises(LughError, match=r"no key named 'acme' on this machine: create it with `lugh keys new acme`"):
        release.publish(mon, home=home, vendor="acme", registry=tmp_path / "elsewhere")
