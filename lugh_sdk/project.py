"""A plugin project on the vendor's disk (what `lugh new` makes): reading its
pyproject.toml and manifest, and building its wheel.

A build records the digest of the sources it was made from in ``dist/.lugh-build.json``,
so that `lugh publish` builds again only when they changed since: pyproject.toml, the
README and the package the entry point names (what goes into the wheel; a virtualenv or
a .git in the project does not count).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from kernel import plugin_store
from kernel.plugin_store import MANIFEST_NAME, Manifest, PluginError
from lugh_sdk.errors import LughError

ENTRY_GROUP = "lugh.plugins"
POETRY_BACKEND = "poetry.core.masonry.api"
BUILD_INFO = ".lugh-build.json"


@dataclass(frozen=True)
class Project:
    path: Path
    name: str
    version: str
    backend: str
    entries: dict[str, str]  # the project's `lugh.plugins` entry points: name -> "module:object"
    vendor: str | None  # [tool.lugh] vendor

    @property
    def entry(self) -> str | None:
        """The entry point, when there is exactly one."""
        return next(iter(self.entries.values())) if len(self.entries) == 1 else None

    @property
    def manifest_path(self) -> Path | None:
        """Where the manifest must be: in the top-level package the entry point names."""
        if self.entry is None:
            return None
        package = self.entry.split(":")[0].split(".")[0]
        return self.path / package / MANIFEST_NAME

    def manifest(self) -> Manifest:
        path = self.manifest_path
        if path is None:
            raise PluginError(f"pyproject.toml must declare exactly one '{ENTRY_GROUP}' entry point, "
                              f"found {len(self.entries)}")
        if not path.is_file():
            raise PluginError(f"no manifest at {path.relative_to(self.path)}: it belongs in the package the entry "
                              f"point {self.entry} names")
        return plugin_store.parse_manifest(path.read_text(), str(path.relative_to(self.path)))


def read_project(path: Path | str) -> Project:
    """Read ``path``/pyproject.toml; raises LughError when it is not a plugin project."""
    path = Path(path).expanduser().resolve()
    file = path / "pyproject.toml"
    if not file.is_file():
        raise LughError(f"{path} is not a plugin project: it has no pyproject.toml (make one with `lugh new`)")
    try:
        data = tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise LughError(f"{file}: not valid TOML ({exc})") from None
    project = data.get("project")
    if not isinstance(project, dict) or not isinstance(project.get("name"), str) \
            or not isinstance(project.get("version"), str):
        raise LughError(f"{file}: a PEP 621 [project] table with a name and a static version is needed")
    entries = project.get("entry-points", {}).get(ENTRY_GROUP, {})
    vendor = data.get("tool", {}).get("lugh", {}).get("vendor")
    return Project(path=path, name=project["name"], version=project["version"],
                   backend=str(data.get("build-system", {}).get("build-backend", "")),
                   entries={str(k): str(v) for k, v in entries.items()} if isinstance(entries, dict) else {},
                   vendor=vendor if isinstance(vendor, str) else None)


def _build_info(project: Project) -> Path:
    return project.path / "dist" / BUILD_INFO


def sources_digest(project: Project) -> str:
    """sha256 over the files a build reads (see the module docstring)."""
    package = project.manifest_path.parent if project.manifest_path else None
    files = [project.path / "pyproject.toml", project.path / "README.md"]
    if package is not None and package.is_dir():
        files += sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    h = hashlib.sha256()
    for file in (f for f in files if f.is_file()):
        h.update(b"%s\0%d\0" % (file.relative_to(project.path).as_posix().encode(), file.stat().st_size))
        h.update(file.read_bytes())
    return h.hexdigest()


def build(project: Project | Path | str) -> Path:
    """Build the wheel with poetry-core into the project's dist/; returns its path."""
    from lugh_sdk import firstparty

    if not isinstance(project, Project):
        project = read_project(project)
    if project.backend != POETRY_BACKEND:
        raise LughError(f"{project.path}/pyproject.toml: build-backend must be {POETRY_BACKEND!r} "
                        f"(found {project.backend or 'none'})")
    digest = sources_digest(project)
    dist = project.path / "dist"
    dist.mkdir(exist_ok=True)
    wheel = firstparty.build_wheel(project.path, dist)
    _build_info(project).write_text(json.dumps({"wheel": wheel.name, "sources": digest}))
    return wheel


def current_wheel(project: Project) -> Path | None:
    """The wheel in dist/ built from the sources as they are now, if there is one."""
    try:
        info = json.loads(_build_info(project).read_text())
    except (OSError, ValueError):
        return None
    wheel = project.path / "dist" / str(info.get("wheel", ""))
    if wheel.is_file() and wheel.suffix == ".whl" and info.get("sources") == sources_digest(project):
        return wheel
    return None
