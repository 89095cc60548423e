"""What a release file is: a plugin wheel, inspected without unpacking it.

Used on both sides: the publisher checks a wheel before signing it, and the target
checks the downloaded wheel again (it trusts no publisher) and compares it with the
signed description (the TUF target's custom ``lugh`` record).
"""

from __future__ import annotations

import base64
import csv
import configparser
import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kernel import plugin_store
from kernel.plugin_store import MANIFEST_NAME, Manifest
from registry.errors import RegistryError

# The manifest fields a release's signed description carries (and the target compares).
SIGNED_FIELDS = ("name", "version", "kind", "api", "architectures", "python", "kernel", "entry", "description")


@dataclass(frozen=True)
class Wheel:
    path: Path
    manifest: Manifest
    sha256: str
    length: int
    record_sha256: str

    @property
    def filename(self) -> str:
        return self.path.name

    def custom(self, vendor: str) -> dict:
        """The signed description of this release (TUF target custom data)."""
        data = {k: getattr(self.manifest, k) for k in SIGNED_FIELDS}
        data["architectures"] = list(data["architectures"])
        return {"lugh": {**data, "vendor": vendor, "record_sha256": self.record_sha256}}


def inspect(path: Path, max_bytes: int | None = None) -> Wheel:
    """Check a wheel as a whole, in memory: size, member names (no path out of its
    root, no link), every member against RECORD, one manifest, the entry point."""
    path = Path(path)
    limit = plugin_store.MAX_WHEEL_BYTES if max_bytes is None else max_bytes
    length = path.stat().st_size
    if length > limit:
        raise RegistryError(f"{path.name} is {length} bytes, over the size limit of {limit} bytes")
    data = path.read_bytes()
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise RegistryError(f"{path.name} is not a valid wheel (zip) file") from None
    with zf:
        plugin_store.check_wheel_members(zf)
        names = [i.filename for i in zf.infolist() if not i.is_dir()]
        if len(names) != len(set(names)):
            raise RegistryError(f"{path.name} has duplicate members")
        records = [n for n in names if PurePosixPath(n).name == "RECORD" and len(PurePosixPath(n).parts) == 2
                   and n.split("/")[0].endswith(".dist-info")]
        if len(records) != 1:
            raise RegistryError(f"{path.name}: expected one .dist-info/RECORD, found {len(records)}")
        record_bytes = zf.read(records[0])
        rows = [r for r in csv.reader(io.StringIO(record_bytes.decode("utf-8", "replace"))) if r]
        listed = {}
        for row in rows:
            listed[row[0]] = row[1] if len(row) > 1 else ""
        for name in names:
            if name not in listed:
                raise RegistryError(f"{path.name}: member {name} is not listed in RECORD")
            if name == records[0]:
                continue
            digest = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(zf.read(name)).digest()).rstrip(b"=").decode()
            if listed[name] != digest:
                raise RegistryError(f"{path.name}: member {name} does not match its RECORD hash")
        missing = [n for n in listed if n not in names]
        if missing:
            raise RegistryError(f"{path.name}: RECORD lists {missing[0]}, which the wheel lacks")
        manifests = [n for n in names if PurePosixPath(n).name == MANIFEST_NAME]
        if len(manifests) != 1:
            raise RegistryError(f"{path.name} has {'no' if not manifests else 'more than one'} {MANIFEST_NAME} "
                                f"(the plugin manifest)")
        try:
            manifest = plugin_store.parse_manifest(zf.read(manifests[0]).decode("utf-8"), manifests[0])
        except UnicodeDecodeError:
            raise RegistryError(f"{manifests[0]}: not UTF-8 text") from None
        entry = _entry_point(zf, records[0].split("/")[0])
        if entry != manifest.entry:
            raise RegistryError(f"{path.name}: 'lugh.plugins' entry point {entry or '(none)'} differs from the "
                                f"manifest's entry {manifest.entry}")
    stem = path.name[:-4] if path.name.endswith(".whl") else path.name
    parts = stem.split("-")
    if len(parts) < 2 or parts[1] != manifest.version:
        raise RegistryError(f"{path.name}: the file name's version differs from the manifest's {manifest.version}")
    return Wheel(path=path, manifest=manifest, sha256=hashlib.sha256(data).hexdigest(), length=length,
                 record_sha256=hashlib.sha256(record_bytes).hexdigest())


def _entry_point(zf: zipfile.ZipFile, dist_info: str) -> str | None:
    try:
        text = zf.read(f"{dist_info}/entry_points.txt").decode("utf-8")
    except KeyError:
        return None
    parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
    parser.optionxform = str
    try:
        parser.read_string(text)
    except configparser.Error:
        raise RegistryError(f"{dist_info}/entry_points.txt is malformed") from None
    if not parser.has_section("lugh.plugins"):
        return None
    values = [v.strip() for v in parser["lugh.plugins"].values()]
    return values[0] if len(values) == 1 else None


def check_against_signed(wheel: Wheel, custom: dict | None, *, name: str, version: str) -> None:
    """The downloaded wheel is the release the registry describes: same manifest,
    same RECORD. (Its bytes were checked against the signed hash already.)"""
    signed = (custom or {}).get("lugh")
    if not isinstance(signed, dict):
        raise RegistryError(f"{name} {version}: the registry's signed description is missing or malformed")
    found = wheel.custom(signed.get("vendor", ""))["lugh"]
    for key in (*SIGNED_FIELDS, "record_sha256"):
        if signed.get(key, "" if key in ("kernel", "description") else None) != found[key]:
            raise RegistryError(f"{name} {version}: the wheel's {key} ({found[key]!r}) differs from the signed "
                                f"description ({signed.get(key)!r}); refused")
    if (found["name"], found["version"]) != (name, version):
        raise RegistryError(f"the release listed as {name} {version} contains {found['name']} {found['version']}")


def manifest_from_signed(custom: dict | None, path: str) -> Manifest:
    """A Manifest from a release's signed description, to check compatibility before
    anything is downloaded."""
    signed = (custom or {}).get("lugh")
    if not isinstance(signed, dict):
        raise RegistryError(f"{path}: the registry's signed description is missing or malformed")
    try:
        return Manifest(name=signed["name"], version=signed["version"], kind=signed["kind"], api=signed["api"],
                        architectures=tuple(signed["architectures"]), python=signed["python"],
                        entry=signed["entry"], description=signed.get("description", ""),
                        kernel=signed.get("kernel", ""))
    except (KeyError, TypeError):
        raise RegistryError(f"{path}: the registry's signed description lacks manifest fields") from None

