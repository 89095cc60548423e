"""Installed plugins on a target: where they live, what their manifest says, whether
they may run here, and whether their files are still the ones that were installed.

Layout: ``<home>/plugins/<name>/<version>/`` holds one unpacked wheel (its package and
its ``.dist-info``). The manifest ``lugh-plugin.toml`` sits inside the package and is
read as data, never imported, so compatibility is decided before any plugin code runs.

Verification checks every file against the sha256 in the wheel's RECORD and refuses any
file RECORD does not list (a planted module or .pyc would otherwise be importable).

Pins: when a plugin is installed, the sha256 of its verified RECORD is written
*outside* the plugin's directory, to ``<home>/state/pins/<name>/<version>.json``
(with the wheel's sha256 and where it came from). The service host checks the
installed RECORD against its pin, then every file against RECORD, before it imports
anything (:func:`verify_installed`): a file, or RECORD itself, changed after
installation is refused at load. Installing from a registry (:mod:`kernel.install`)
first checks the wheel against the registry's signed hashes.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import platform
import re
import shutil
import sys
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kernel import KERNEL_VERSION
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
    kernel: str = ""  # optional range of kernel versions, e.g. ">=0.1,<1"


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
    kernel = data.get("kernel", "")
    if not isinstance(kernel, str):
        raise PluginError(f"{source}: kernel must be a version range string")
    for spec in (data["api"], data["python"], *([kernel] if kernel else [])):
        _parse_range(spec)
    return Manifest(name=data["name"], version=data["version"], kind=data["kind"], api=data["api"],
                    architectures=tuple(arches), python=data["python"], entry=data["entry"],
                    description=str(data.get("description", "")), kernel=kernel)


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
    if manifest.kernel and not in_range(KERNEL_VERSION, manifest.kernel):
        raise PluginError(f"{manifest.name} {manifest.version} needs LughOS kernel {manifest.kernel}; "
                          f"this target runs {KERNEL_VERSION}")
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


def split_spec(spec: str) -> tuple[str, str | None]:
    """``name==version`` -> (name, version); ``name`` -> (name, None)."""
    name, sep, version = spec.partition("==")
    return name.strip(), (version.strip() or None) if sep else None


def locate(home: Path, name: str, version: str | None = None) -> Path:
    """The directory of an installed plugin: ``name`` may be ``name==version``;
    without a version, the newest installed."""
    if version is None:
        name, version = split_spec(name)
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


def stage_wheel(wheel: Path, staging: Path) -> Manifest:
    """Unpack ``wheel`` into the empty directory ``staging`` and check it there: safe
    member names and sizes, every file against RECORD, the manifest, compatibility."""
    if wheel.stat().st_size > MAX_WHEEL_BYTES:
        raise PluginError(f"{wheel.name} is larger than {MAX_WHEEL_BYTES} bytes")
    try:
        with zipfile.ZipFile(wheel) as zf:
            check_wheel_members(zf)
            zf.extractall(staging)
    except zipfile.BadZipFile:
        raise PluginError(f"{wheel.name} is not a valid wheel (zip) file") from None
    verify_files(staging)
    manifest = read_manifest(staging)
    check_compatible(manifest)
    return manifest


# --- pins: the verified RECORD digest, kept outside the plugin's directory -------------

def pin_path(home: Path, name: str, version: str) -> Path:
    return Path(home) / "state" / "pins" / name / f"{version}.json"


def read_pin(home: Path, name: str, version: str) -> dict | None:
    try:
        return json.loads(pin_path(home, name, version).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise PluginError(f"{name} {version}: its installation pin is unreadable") from None


def write_pin(home: Path, manifest: Manifest, root: Path, **provenance) -> dict:
    """Pin the verified RECORD of the plugin unpacked at ``root`` (durably, in one
    rename) before it is moved into place."""
    pin = {"name": manifest.name, "version": manifest.version, "kind": manifest.kind,
           "record_sha256": record_digest(root), "installed_at": time.time(), **provenance}
    path = pin_path(home, manifest.name, manifest.version)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(pin, indent=2, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return pin


def remove_pin(home: Path, name: str, version: str) -> None:
    path = pin_path(home, name, version)
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass


def verify_installed(root: Path) -> dict:
    """What the service host checks before importing the plugin installed at
    ``<home>/plugins/<name>/<version>``: RECORD is the one pinned at installation and
    every file is the one RECORD lists. Returns the pin."""
    root = Path(root)
    home, name, version = root.parent.parent.parent, root.parent.name, root.name
    pin = read_pin(home, name, version)
    if pin is None:
        raise PluginError(f"{name} {version} has no installation pin ({pin_path(home, name, version)}): "
                          f"it was not installed by LughOS; refused")
    found = record_digest(root)
    if found != pin.get("record_sha256"):
        raise PluginError(f"{name} {version}: RECORD changed after installation (pinned sha256 "
                          f"{str(pin.get('record_sha256'))[:16]}, found {found[:16]}); refused")
    verify_files(root)
    return pin


def activate(home: Path, staging: Path, manifest: Manifest, **provenance) -> Path:
    """Pin, then move the verified tree at ``staging`` into place in one rename."""
    dest = plugins_dir(home) / manifest.name / manifest.version
    if dest.exists():
        raise PluginError(f"{manifest.name} {manifest.version} is already installed")
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_pin(home, manifest, staging, **provenance)
    try:
        staging.rename(dest)
    except OSError:
        remove_pin(home, manifest.name, manifest.version)
        raise
    return dest


def deactivate(home: Path, name: str, version: str) -> None:
    """Remove an installed version: out of sight in one rename, then deleted."""
    dest = plugins_dir(home) / name / version
    if dest.exists():
        trash = plugins_dir(home) / f".trash-{name}-{version}-{os.getpid()}-{time.monotonic_ns()}"
        dest.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    remove_pin(home, name, version)
    try:
        dest.parent.rmdir()
    except OSError:
        pass


def install_wheel(home: Path, wheel: Path, *, replace: bool = False) -> tuple[Manifest, Path]:
    """Unpack, verify and check a wheel in a staging directory, then move it into place
    in one rename: the target has either the whole plugin or nothing of it. No
    signature is checked here: this is for wheels built on this machine from sources
    it has (tests); plugins from a registry go through :mod:`kernel.install`."""
    base = plugins_dir(home)
    staging = base / f".staging-{wheel.stem}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest = stage_wheel(wheel, staging)
        dest = base / manifest.name / manifest.version
        if dest.exists():
            if not replace:
                raise PluginError(f"{manifest.name} {manifest.version} is already installed")
            deactivate(home, manifest.name, manifest.version)
        return manifest, activate(home, staging, manifest, source="wheel", wheel_sha256=_file_sha256(wheel))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
