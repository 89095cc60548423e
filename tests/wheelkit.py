"""Test helpers for the registry: plugin wheels made in memory (good ones, and each
kind of bad one), a registry with a vendor, a target that trusts it, and an attacker's
way of putting a release into a registry without the publisher's checks.

Wheels are written directly with zipfile (no build step): deterministic and fast.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kernel import plugin_store
from registry import publish, trust
from registry.keys import KeyStore
from registry.repo import Repository, _atomic_write, _bump, target_path

SCHEDULER = '''
from lugh_sdk.api import hookimpl
from lugh_sdk.api.queues import KeyedScheduler


class Plugin(KeyedScheduler):
    """Earliest deadline first (a test plugin)."""

    KIND = "{kind}"

    @staticmethod
    def urgency(job):
        return job.deadline
'''

UNHEALTHY = SCHEDULER + '''
    @hookimpl
    def sched_health(self):
        return False
'''


def manifest_text(name: str, version: str, pkg: str, **over) -> str:
    data = {"name": name, "version": version, "kind": "scheduler", "api": ">=1.0,<2",
            "architectures": ["x86_64", "aarch64"], "python": ">=3.11", "entry": f"{pkg}.plugin:Plugin",
            "description": f"test plugin {name}"}
    data.update(over)
    lines = []
    for k, v in data.items():
        if isinstance(v, list):
            lines.append(f"{k} = [" + ", ".join(f'"{x}"' for x in v) + "]")
        else:
            lines.append(f'{k} = "{v}"')
    return "\n".join(lines) + "\n"


def _hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(out_dir: Path, name: str, version: str = "1.0.0", *, code: str = SCHEDULER, manifest: str | None = None,
               no_manifest: bool = False, extra: list = (), **manifest_over) -> Path:
    """A plugin wheel. ``extra``: (name or ZipInfo, bytes) members added (and listed in
    RECORD, so that only the member check can refuse them)."""
    pkg = "lugh_t_" + name.replace("-", "_")
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    members: list = [
        (f"{pkg}/__init__.py", b""),
        (f"{pkg}/plugin.py", code.format(kind=name).encode()),
    ]
    if not no_manifest:
        text = manifest if manifest is not None else manifest_text(name, version, pkg, **manifest_over)
        members.append((f"{pkg}/{plugin_store.MANIFEST_NAME}", text.encode()))
    members += [
        (f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()),
        (f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: wheelkit\nRoot-Is-Purelib: true\nTag: py3-none-any\n"),
        (f"{info}/entry_points.txt", f"[lugh.plugins]\n{name}={pkg}.plugin:Plugin\n".encode()),
        *extra,
    ]
    record = "".join(f"{m.filename if isinstance(m, zipfile.ZipInfo) else m},{_hash(d)},{len(d)}\n"
                     for m, d in members) + f"{info}/RECORD,,\n"
    members.append((f"{info}/RECORD", record.encode()))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for member, data in members:
            if isinstance(member, zipfile.ZipInfo):
                zf.writestr(member, data)
            else:
                zf.writestr(zipfile.ZipInfo(member, date_time=(2024, 1, 1, 0, 0, 0)), data)
    return path


def symlink_member(name: str, points_to: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    info.external_attr = (0o120777 << 16)
    return info, points_to.encode()


@dataclass
class World:
    """A registry run by an operator, a vendor 'acme' (packages acme-*), and a target
    home that trusts the registry as 'test'."""
    registry: Path
    operator: Path  # the operator's home (registry role keys)
    vendor_key: Path  # acme's private key
    target: Path  # the target's home
    wheels: Path

    @property
    def repo(self) -> Repository:
        return Repository.open(self.registry, KeyStore(self.operator / "keys"))

    def publish(self, wheel: Path, vendor: str = "acme", key: Path | None = None) -> dict:
        return publish.publish(self.registry, wheel, vendor, key or self.vendor_key, home=self.operator)

    def wheel(self, name: str, version: str = "1.0.0", **kw) -> Path:
        return make_wheel(self.wheels / f"{name}-{version}-{time.monotonic_ns()}", name, version, **kw)

    def forge(self, wheel: Path, *, vendor: str = "acme", signer=None, name: str | None = None,
              version: str | None = None, custom: dict | None = None) -> str:
        """Put ``wheel`` into ``vendor``'s role the way an attacker holding a key
        would (no publisher checks): signed by ``signer`` (default: the vendor's real
        key), with snapshot and timestamp re-signed by the registry. Returns the
        target path."""
        from registry.keys import signer_from_file
        from tuf.api.metadata import TargetFile

        repo = self.repo
        data = wheel.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        name = name or wheel.name.split("-")[0].replace("_", "-")
        version = version or wheel.name.split("-")[1]
        if custom is None:
            custom = {"lugh": {"name": name, "version": version, "kind": "scheduler", "api": ">=1.0,<2",
                               "architectures": ["x86_64", "aarch64"], "python": ">=3.11", "kernel": "",
                               "entry": "x:y", "description": "", "vendor": vendor, "record_sha256": "0" * 64}}
        path = target_path(name, wheel.name)
        dest = repo.targets_dir / name / f"{sha}.{wheel.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(dest, data)
        with repo.lock():
            md = repo.vendor_metadata(vendor)
            md.signed.targets[path] = TargetFile(length=len(data), hashes={"sha256": sha}, path=path,
                                                 unrecognized_fields={"custom": custom})
            _bump(md, "vendor")
            md.signatures.clear()
            md.sign(signer or signer_from_file(self.vendor_key))
            repo.commit({vendor: md})
        return path


def make_world(tmp: Path) -> World:
    operator = tmp / "operator"
    store = KeyStore(operator / "keys")
    registry = tmp / "registry"
    repo = Repository.create(registry, store, "test")
    vendor_store = KeyStore(tmp / "acme" / "keys")
    vendor_store.new("acme")
    repo.add_vendor("acme", vendor_store.public_key("acme"), ["acme-*"])
    target = tmp / "home"
    target.mkdir(exist_ok=True)
    trust.add(target, "test", str(registry), (registry / "metadata" / "1.root.json").read_bytes())
    return World(registry=registry, operator=operator, vendor_key=vendor_store.private_path("acme"),
                 target=target, wheels=tmp / "wheels")


def snapshot(home: Path, *, with_trust: bool = False) -> dict:
    """Every file of a target home and its sha256, but the journal, what running
    services change by themselves (``run/``, ``data/``) and (unless ``with_trust``)
    the cache of verified registry metadata."""
    out = {}
    for root, dirs, files in os.walk(home):
        rel_root = Path(root).relative_to(home)
        if rel_root.parts and rel_root.parts[0] in ("run", "data"):
            continue
        if not with_trust and len(rel_root.parts) >= 3 and rel_root.parts[0] == "trust" and rel_root.parts[2] == "metadata":
            continue
        for f in files:
            rel = rel_root / f
            if rel == Path("state/journal.log") or f.endswith(".lock"):
                continue
            p = Path(root) / f
            out[str(rel)] = "link:" + os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
        for d in dirs:
            out.setdefault(str(rel_root / d) + "/", "dir")
    return out
