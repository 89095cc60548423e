"""`lugh new`: for every kind, the generated project builds with poetry-core, installs
and verifies like any plugin, and its own tests (which use the SDK's harness) pass,
straight away, with no edit. Bad names and existing directories are refused with a
clear error, and nothing is written."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kernel import plugin_store
from lugh_sdk import project, scaffold
from lugh_sdk.api import PLUGIN_API_VERSION
from lugh_sdk.errors import LughError

KINDS = ("scheduler", "storage", "monitor")


def lugh(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lugh_sdk", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("kind", KINDS)
def test_a_new_project_builds_installs_and_passes_its_own_tests(kind, tmp_path):
    name = f"acme-{kind}-x"
    path = scaffold.new_project(kind, name, vendor="acme", directory=tmp_path / name)

    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    module = name.replace("-", "_")
    assert files == sorted([".gitignore", "README.md", "pyproject.toml", f"{module}/__init__.py",
                            f"{module}/lugh-plugin.toml", f"{module}/plugin.py", f"tests/test_{module}.py"])
    for file in files:
        assert not re.search(r"\$\{?[a-z_]+", (path / file).read_text()), f"{file} has an unrendered placeholder"
    meta = tomllib.loads((path / "pyproject.toml").read_text())
    assert meta["build-system"]["build-backend"] == "poetry.core.masonry.api"
    assert meta["project"]["entry-points"]["lugh.plugins"] == {name: f"{module}.plugin:Acme{kind.capitalize()}X"}
    manifest = project.read_project(path).manifest()
    assert (manifest.name, manifest.kind, manifest.api) == (name, kind, f">={PLUGIN_API_VERSION},<2")
    plugin_store.check_compatible(manifest, kind=kind)

    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"\b\d+ passed\b", proc.stdout) and "failed" not in proc.stdout

    wheel = project.build(path)
    assert wheel.parent == path / "dist" and wheel.name == f"{module}-0.1.0-py3-none-any.whl"
    staged = tmp_path / "staged"
    staged.mkdir()
    assert plugin_store.stage_wheel(wheel, staged) == manifest  # verifies every file against RECORD


def test_the_cli_creates_a_project_and_refuses_an_existing_directory(tmp_path):
    made = lugh("new", "scheduler", "my-sched", "--vendor", "acme", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "my-sched" / "my_sched" / "plugin.py").is_file()
    before = {p: p.read_bytes() for p in (tmp_path / "my-sched").rglob("*") if p.is_file()}
    again = lugh("new", "monitor", "my-sched", cwd=tmp_path)
    assert again.returncode == 1
    assert "already exists" in again.stderr and "Traceback" not in again.stderr
    assert {p: p.read_bytes() for p in (tmp_path / "my-sched").rglob("*") if p.is_file()} == before
    other = lugh("new", "storage", "store-two", "--dir", str(tmp_path / "elsewhere" / "s2"), cwd=tmp_path)
    assert other.returncode == 0, other.stderr
    assert (tmp_path / "elsewhere" / "s2" / "store_two" / "lugh-plugin.toml").is_file()


@pytest.mark.parametrize("name, problem", [
    ("My-Sched", "not a valid plugin name"), ("x", "not a valid plugin name"), ("9lives", "not a valid plugin name"),
    ("sched-", "not a valid plugin name"), ("a--b", "not a valid plugin name"), ("my_sched", "not a valid plugin name"),
    ("a" * 65, "not a valid plugin name"), ("../evil", "not a valid plugin name"),
    ("class", "reserved"), ("tests", "reserved"), ("json", "would shadow"), ("pluggy", "would shadow"),
])
def test_a_bad_name_is_refused_and_nothing_is_written(tmp_path, name, problem):
    with pytest.raises(LughError, match=problem):
        scaffold.new_project("scheduler", name, vendor="acme", directory=tmp_path / "p")
    assert list(tmp_path.iterdir()) == []


def test_the_cli_refuses_a_bad_name_clearly(tmp_path):
    proc = lugh("new", "storage", "Bad Name", cwd=tmp_path)
    assert proc.returncode == 1 and "not a valid plugin name" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, problem", [
    (dict(kind="scheduller"), "unknown plugin kind"), (dict(vendor="Acme Inc"), "not a valid vendor name"),
    (dict(vendor="x"), "not a valid vendor name"), (dict(vendor="root"), "cannot be a vendor name"),
])
def test_a_bad_kind_or_vendor_is_refused_and_nothing_is_written(tmp_path, kwargs, problem):
    args = {"kind": "scheduler", "vendor": "acme", **kwargs}
    with pytest.raises(LughError, match=problem):
        scaffold.new_project(args["kind"], "fine-name", vendor=args["vendor"], directory=tmp_path / "p")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_empty_directory_or_file_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("mine")
    for target in ("empty", "file"):
        with pytest.raises(LughError, match="already exists"):
            scaffold.new_project("monitor", "fine-name", vendor="acme", directory=tmp_path / target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file"]
    assert (tmp_path / "file").read_text() == "mine" and list((tmp_path / "empty").iterdir()) == []


def test_names_follow_the_registry_and_the_store(monkeypatch):
    from registry.repo import TOP_ROLES, VENDOR_RE

    assert scaffold.VENDOR_RE.pattern == VENDOR_RE.pattern and scaffold.RESERVED_VENDORS == TOP_ROLES
    monkeypatch.delenv("LUGH_VENDOR", raising=False)
    for login, vendor in (("Jane.Doe", "jane-doe"), ("root", "vendor"), ("x", "vendor")):
        monkeypatch.setattr(scaffold.getpass, "getuser", lambda login=login: login)
        assert scaffold.default_vendor() == vendor
    monkeypatch.setenv("LUGH_VENDOR", "acme")
    assert scaffold.default_vendor() == "acme"
    assert scaffold.api_range("1.1") == ">=1.1,<2" and scaffold.api_range("2.0") == ">=2.0,<3"
    assert plugin_store.in_range(PLUGIN_API_VERSION, scaffold.api_range())
