"""`lugh check`: is a plugin project fit to publish, and would a target load it?

The checks, in order (each a line of the report):

1. pyproject.toml: PEP 621 metadata, built with poetry-core;
2. exactly one entry point in the ``lugh.plugins`` group;
3. the manifest (``<package>/lugh-plugin.toml``) is valid (:func:`kernel.plugin_store.parse_manifest`);
4. the manifest agrees with pyproject.toml: name, version, entry point;
5. compatible with this SDK: the API range contains the running plugin API, this
   machine's architecture and Python are listed (:func:`kernel.plugin_store.check_compatible`);
6. the wheel (built into a scratch directory, or the one given) unpacks and verifies as
   a target installs it: member names, sizes, every file against RECORD, the manifest
   inside it (:func:`kernel.plugin_store.stage_wheel`), installed with its pin into a
   scratch home;
7. it loads in a child process exactly as the service host loads it
   (:func:`kernel.services.host.load_plugin`), without a kernel;
8. every hook of its kind is implemented (optional groups whole or not at all);
9. the conformance suite of its kind (:mod:`lugh_sdk.harness`), one line per case.

A check that cannot run because an earlier one failed is reported as skipped.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kernel import plugin_store
from kernel.plugin_store import Manifest, PluginError
from lugh_sdk.api import PLUGIN_API_VERSION
from lugh_sdk.errors import LughError
from lugh_sdk.home import source_root
from lugh_sdk.project import ENTRY_GROUP, POETRY_BACKEND, Project, read_project

CHILD_TIMEOUT = 300.0


@dataclass(frozen=True)
class Item:
    name: str
    status: str  # passed | failed | skipped
    detail: str = ""


@dataclass
class Report:
    project: Path
    items: list[Item] = field(default_factory=list)
    manifest: Manifest | None = None
    wheel: str | None = None  # file name of the wheel checked

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def failed(self) -> list[Item]:
        return [i for i in self.items if i.status == "failed"]

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.items.append(Item(name, "passed" if ok else "failed", detail))
        return ok

    def skip(self, names: list[str], why: str) -> None:
        self.items += [Item(n, "skipped", why) for n in names]

    def to_dict(self) -> dict:
        return {"project": str(self.project), "ok": self.ok, "wheel": self.wheel,
                "name": self.manifest.name if self.manifest else None,
                "version": self.manifest.version if self.manifest else None,
                "kind": self.manifest.kind if self.manifest else None,
                "checks": [asdict(i) for i in self.items]}


LATER = ["wheel", "loads in the service host", "hooks", "conformance"]


def _static(project: Project, report: Report) -> Manifest | None:
    """Checks 1-5, from the sources alone; the manifest when it can be used further."""
    report.add("pyproject.toml", project.backend == POETRY_BACKEND,
               f"{project.name} {project.version}, built with poetry-core" if project.backend == POETRY_BACKEND
               else f"build-backend must be {POETRY_BACKEND!r}, found {project.backend or 'none'}")
    if not report.add("entry point", project.entry is not None,
                      f"{ENTRY_GROUP}: {', '.join(f'{k} = {v}' for k, v in project.entries.items())}"
                      if project.entry else f"exactly one '{ENTRY_GROUP}' entry point is needed, "
                                            f"found {len(project.entries)}"):
        report.skip(["manifest", "manifest matches pyproject.toml", "compatible"], "needs the entry point")
        return None
    try:
        manifest = project.manifest()
    except PluginError as exc:
        report.add("manifest", False, str(exc))
        report.skip(["manifest matches pyproject.toml", "compatible"], "needs a valid manifest")
        return None
    report.manifest = manifest
    report.add("manifest", True, f"{manifest.kind} plugin, API {manifest.api}, "
                                 f"{', '.join(manifest.architectures)}, Python {manifest.python}")
    differ = [f"{what}: manifest {theirs!r}, pyproject.toml {ours!r}" for what, theirs, ours in (
        ("name", manifest.name, project.name), ("version", manifest.version, project.version),
        ("entry", manifest.entry, project.entry)) if theirs != ours]
    report.add("manifest matches pyproject.toml", not differ, "; ".join(differ) or "name, version and entry agree")
    try:
        plugin_store.check_compatible(manifest)
        report.add("compatible", True, f"plugin API {PLUGIN_API_VERSION}, {platform.machine()}, "
                                       f"Python {platform.python_version()}")
    except PluginError as exc:
        report.add("compatible", False, str(exc))
    return manifest if report.ok else None


def _install_scratch(wheel: Path, home: Path) -> Path:
    """Install ``wheel`` into the scratch ``home`` as a target would (without a registry)."""
    staging = plugin_store.plugins_dir(home) / ".staging"
    staging.mkdir(parents=True)
    manifest = plugin_store.stage_wheel(wheel, staging)
    return plugin_store.activate(home, staging, manifest, source="lugh check", wheel=wheel.name)


def _child(plugin_dir: Path, kind: str, conformance: bool, scratch: Path, timeout: float) -> dict:
    out = scratch / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(source_root()), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "lugh_sdk.harness.runner", str(plugin_dir), kind, str(out)]
    try:
        proc = subprocess.run(cmd + ([] if conformance else ["--no-conformance"]), cwd=scratch, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"load": {"ok": False, "detail": f"the plugin's checks did not finish in {timeout:.0f} s"}}
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"load": {"ok": False, "detail": f"the checking process failed (exit {proc.returncode}): "
                                                + " | ".join(tail)}}
    return json.loads(out.read_text())


def check_project(path: Path | str = ".", *, wheel: Path | None = None, conformance: bool = True,
                  timeout: float = CHILD_TIMEOUT) -> Report:
    """Run the checks on the project at ``path`` (against ``wheel`` if given, else a
    wheel built for the purpose). Raises LughError only when ``path`` is no project."""
    from lugh_sdk import firstparty

    project = read_project(path)
    report = Report(project=project.path)
    manifest = _static(project, report)
    if manifest is None:
        report.skip(LATER, "fix the problems above first")
        return report
    with tempfile.TemporaryDirectory(prefix="lugh-check-") as tmp:
        scratch = Path(tmp)
        try:
            if wheel is None:
                (scratch / "dist").mkdir()
                wheel = firstparty.build_wheel(project.path, scratch / "dist")
            report.wheel = Path(wheel).name
            plugin_dir = _install_scratch(Path(wheel), scratch / "home")
        except (PluginError, LughError) as exc:
            report.add("wheel", False, str(exc))
            report.skip(LATER[1:], "needs a wheel that installs")
            return report
        report.add("wheel", True, f"{report.wheel}: files verified against RECORD, manifest inside")
        result = _child(plugin_dir, manifest.kind, conformance, scratch, timeout)
    load = result["load"]
    if not report.add("loads in the service host", load["ok"], load["detail"]):
        report.skip(LATER[2:], "needs a plugin that loads")
        return report
    hooks = result["hooks"]
    if not report.add("hooks", hooks["ok"], hooks["detail"]):
        report.skip(["conformance"], "needs every hook of its kind")
        return report
    if not conformance:
        report.skip(["conformance"], "not asked for (--no-conformance)")
    for case in result["cases"]:
        report.items.append(Item(f"conformance: {case['name']}", case["status"], case["detail"]))
    return report
