"""Each first-party plugin project's own test suite passes (as a vendor would run it),
and each builds into a wheel that installs and verifies like any plugin."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kernel import plugin_store
from lugh_sdk import firstparty


@pytest.mark.parametrize("name", firstparty.FIRST_PARTY)
def test_plugin_project_tests_pass(name):
    project = firstparty.plugins_source() / name
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=project,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


def test_first_party_install_verifies_and_refuses_tampering(home):
    installed = firstparty.ensure_installed(home)
    assert set(installed) == set(firstparty.FIRST_PARTY)
    assert firstparty.ensure_installed(home) == []  # unchanged sources: nothing rebuilt
    root = plugin_store.locate(home, "edf-scheduler")
    plugin_store.verify_files(root)
    manifest = plugin_store.read_manifest(root)
    assert (manifest.kind, manifest.name) == ("scheduler", "edf-scheduler")
    module = next(root.glob("lugh_edf_scheduler/plugin.py"))
    module.write_text(module.read_text() + "\n# changed after installation\n")
    with pytest.raises(plugin_store.PluginError, match="modified after installation"):
        plugin_store.verify_files(root)
    (root / "lugh_edf_scheduler" / "extra.py").write_text("x = 1\n")
    module.unlink()
    with pytest.raises(plugin_store.PluginError):
        plugin_store.verify_files(root)


def test_manifest_compatibility_is_checked_before_import():
    good = dict(name="x-sched", version="1.0.0", kind="scheduler", api=">=1.0,<2", architectures=["x86_64", "aarch64"],
                python=">=3.11", entry="x:y")

    def manifest(**over):
        data = {**good, **over}
        lines = [f"{k} = {v!r}".replace("'", '"') for k, v in data.items()]
        return plugin_store.parse_manifest("\n".join(lines))

    plugin_store.check_compatible(manifest())
    with pytest.raises(plugin_store.PluginError, match="needs plugin API >=2.0"):
        plugin_store.check_compatible(manifest(api=">=2.0"))
    with pytest.raises(plugin_store.PluginError, match="this target is"):
        plugin_store.check_compatible(manifest(architectures=["riscv64"]))
    with pytest.raises(plugin_store.PluginError, match="a storage plugin is needed"):
        plugin_store.check_compatible(manifest(), kind="storage")
    with pytest.raises(plugin_store.PluginError, match="missing"):
        plugin_store.parse_manifest('name = "x"')
    with pytest.raises(plugin_store.PluginError, match="not valid TOML"):
        plugin_store.parse_manifest("name = ")
    with pytest.raises(plugin_store.PluginError, match="kind"):
        manifest(kind="driver")
