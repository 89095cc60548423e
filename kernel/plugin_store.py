"""Installed plugins on a target: where they live, what their manifest says, whether
they may run here, and whether their files are still the ones that were installed.

Layout: ``<home>/plugins/<name>/<version>/`` holds one unpacked wheel (its package and
its ``.dist-info``). The manifest ``lugh-plugin.toml`` sits inside the package and is
read as data, never imported, so compatibility is decided before any plugin code runs.

Verification checks every file against the sha256 in the wheel's RECORD and refuses any
file RECORD does not list (a planted module or .pyc would otherwise be importable).
The registry layer signs RECORD's digest; this module checks the files against it.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import platform
import re
import shutil
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lugh_sdk.api import KINDS, PLUGIN_API_VERSION

MANIFEST_NAME = "lugh-plugin.toml"
MAX_WHEEL_BYTES = 32 * 1024 * 1024
MAX_UNPACKED_BYTES = 128 * 1024 * 1024
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{1,63}$")


class PluginError(Exception):
    """A plugin that must not be installed or loaded; the message says why."""


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    kind: str
    api: str
    architectures: tuple[str, ...]
    python: str
    entry: str
    description: str = ""


def parse_manifest(text: str, source: str = MANIFEST_NAME) -> Manifest:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PluginError(f"{source}: not valid TOML ({exc})") from None
    missing = [k for k in ("name", "version", "kind", "api", "architectures", "python", "entry") if k not in data]
    if missing:
        raise PluginError(f"{source}: missing {', '.join(missing)}")
    if not isinstance(data["name"], str) or not NAME_RE.match(data["name"]):
        raise PluginError(f"{source}: name {data['name']!r} is not a valid plugin name (lowercase, digits, '-')")
    if data["kind"] not in KINDS:
        raise PluginError(f"{source}: kind {data['kind']!r} is not one of {', '.join(KINDS)}")
    arches = data["architectures"]
    if not isinstance(arches, list) or not arches or not all(isinstance(a, str) for a in arches):
        raise PluginError(f"{source}: architectures must be a non-empty list of strings")
    for key in ("version", "api", "python", "entry"):
        if not isinstance(data[key], str) or not data[key]:
            raise PluginError(f"{source}: {key} must be a non-empty string")
    if ":" not in data["entry"]:
        raise PluginError(f"{source}: entry must be 'module:object'")
    parse_version(data["version"])
    for spec in (data["api"], data["python"]):
        _parse_range(spec)
    return Manifest(name=data["name"], version=data["version"], kind=data["kind"], api=data["api"],
                    architectures=tuple(arches), python=data["python"], entry=data["entry"],
                    description=str(data.get("description", "")))


def parse_version(text: str) -> tuple[int, ...]:
    if not re.fullmatch(r"\d+(\.\d+){0,3}", text):
        raise PluginError(f"version {text!r} is not of the form N.N.N")
    return tuple(int(p) for p in text.split("."))


_OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
        "<": lambda a, b: a < b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}


def _parse_range(spec: str) -> list[tuple[str, tuple[int, ...]]]:
    clauses = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(>=|<=|==|!=|>|<)\s*([\d.]+)\s*", part)
        if not m:
            raise PluginError(f"version range {spec!r}: cannot read {part.strip()!r}")
        clauses.append((m.group(1), parse_version(m.group(2))))
    return clauses


def in_range(version: str, spec: str) -> bool:
    v = parse_version(version)

    def pad(t, n):
        return t + (0,) * (n - len(t))

    for op, bound in _parse_range(spec):
        n = max(len(v), len(bound))
        if not _OPS[op](pad(v, n), pad(bound, n)):
            return False
    return True


def check_compatible(manifest: Manifest, *, kind: str | None = None) -> None:
    """Refuse, saying what is needed and what was found."""
    if kind and manifest.kind != kind:
        raise PluginError(f"{manifest.name} is a {manifest.kind} plugin, a {kind} plugin is needed")
    if not in_range(PLUGIN_API_VERSION, manifest.api):
        raise PluginError(f"{manifest.name} {manifest.version} needs plugin API {manifest.api}; "
                          f"this kernel provides {PLUGIN_API_VERSION}")
    arch = platform.machine()
    if arch not in manifest.architectures:
        raise PluginError(f"{manifest.name} {manifest.version} supports {', '.join(manifest.architectures)}; "
                          f"this target is {arch}")
    py = "%d.%d.%d" % sys.version_info[:3]
    if not in_range(py, manifest.python):
        raise PluginError(f"{manifest.name} {manifest.version} needs Python {manifest.python}; this target has {py}")


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _record_of(root: Path) -> tuple[Path, list[list[str]]]:
    records = list(root.glob("*.dist-info/RECORD"))
    if len(records) != 1:
        raise PluginError(f"{root}: expected one .dist-info/RECORD, found {len(records)}")
    return records[0], list(csv.reader(io.StringIO(records[0].read_text())))


def record_digest(root: Path) -> str:
    """sha256 of the RECORD file: one value that pins every installed file."""
    path, _ = _record_of(root)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify_files(root: Path) -> None:
    """Every file listed in RECORD has its recorded hash; no other file exists."""
    record_path, rows = _record_of(root)
    listed = set()
    for row in rows:
        if not row:
            continue
        rel = row[0]
        listed.add(rel)
        if len(row) < 2 or not row[1]:
            if root / rel != record_path:
                raise PluginError(f"{rel}: RECORD gives no hash")
            continue
        path = root / rel
        if not path.is_file() or path.is_symlink():
            raise PluginError(f"{rel}: listed in RECORD but missing")
        if _record_hash(path.read_bytes()) != row[1]:
            raise PluginError(f"{rel}: content differs from the installed version (modified after installation)")
    for path in root.rglob("*"):
        if path.is_symlink() or (path.is_file() and path.relative_to(root).as_posix() not in listed):
            raise PluginError(f"{path.relative_to(root)}: file not part of the installed plugin")


def read_manifest(root: Path) -> Manifest:
    _, rows = _record_of(root)
    found = [row[0] for row in rows if row and PurePosixPath(row[0]).name == MANIFEST_NAME]
    if len(found) != 1:
        raise PluginError(f"{root.name}: the plugin has {'no' if not found else 'more than one'} {MANIFEST_NAME}")
    return parse_manifest((root / found[0]).read_text(), found[0])


def plugins_dir(home: Path) -> Path:
    return home / "plugins"


def installed(home: Path) -> dict[str, list[str]]:
    """name -> installed versions, oldest first."""
    out: dict[str, list[str]] = {}
    base = plugins_dir(home)
    if not base.is_dir():
        return out
    for name_dir in sorted(base.iterdir()):
        if name_dir.is_dir() and NAME_RE.match(name_dir.name):
            versions = [v.name for v in name_dir.iterdir() if v.is_dir() and re.fullmatch(r"[\d.]+", v.name)]
            if versions:
                out[name_dir.name] = sorted(versions, key=parse_version)
    return out


def locate(home: Path, name: str, version: str | None = None) -> Path:
    versions = installed(home).get(name)
    if not versions:
        raise PluginError(f"plugin {name!r} is not installed on this target")
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise PluginError(f"plugin {name} {version} is not installed (installed: {', '.join(versions)})")
    return plugins_dir(home) / name / version


def check_wheel_members(zf: zipfile.ZipFile) -> None:
    total = 0
    for info in zf.infolist():
        p = PurePosixPath(info.filename)
        if p.is_absolute() or ".." in p.parts or "\\" in info.filename:
            raise PluginError(f"wheel member {info.filename!r} points outside the plugin's root")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise PluginError(f"wheel member {info.filename!r} is a symbolic link")
        total += info.file_size
        if total > MAX_UNPACKED_BYTES:
            raise PluginError(f"wheel unpacks to more than {MAX_UNPACKED_BYTES} bytes")


def install_wheel(home: Path, wheel: Path, *, replace: bool = False) -> tuple[Manifest, Path]:
    """Unpack, verify and check a wheel in a staging directory, then move it into place
    in one rename: the target has either the whole plugin or nothing of it."""
    if wheel.stat().st_size > MAX_WHEEL_BYTES:
        raise PluginError(f"{wheel.name} is larger than {MAX_WHEEL_BYTES} bytes")
    base = plugins_dir(home)
    staging = base / f".staging-{wheel.stem}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        try:
            with zipfile.ZipFile(wheel) as zf:
                check_wheel_members(zf)
                zf.extractall(staging)
        except zipfile.BadZipFile:
            raise PluginError(f"{wheel.name} is not a valid wheel (zip) file") from None
        verify_files(staging)
        manifest = read_manifest(staging)
        check_compatible(manifest)
        dest = base / manifest.name / manifest.version
        if dest.exists():
            if not replace:
                raise PluginError(f"{manifest.name} {manifest.version} is already installed")
            old = dest.with_name(dest.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            shutil.rmtree(old)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(dest)
        return manifest, dest
    finally:
        shutil.rmtree(staging, ignore_errors=True)
