"""What a target trusts: for each registry it installs from, a root of trust it holds
itself, never one handed over with a plugin.

``<home>/trust/<name>/``:

- ``registry.json``: the registry's location (a directory or an http(s) URL);
- ``root.json``: the trust anchor, the root metadata given when the registry was
  trusted (for the machine's own registry: the root it created);
- ``metadata/``: python-tuf's cache of verified metadata. Newer roots are followed
  from the anchor through the signed chain; the cached versions are what makes a
  rollback to older metadata, or a freeze, detectable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from registry.errors import RegistryError

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
LOCAL = "local"  # the machine's own registry (LUGH_HOME/registry)


def to_url(location: str | os.PathLike) -> str:
    """A registry location as a base URL ending in '/': a URL as given, a directory
    as ``file://``."""
    text = str(location)
    if "://" in text:
        return text if text.endswith("/") else text + "/"
    return Path(text).expanduser().resolve().as_uri() + "/"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class Trusted:
    name: str
    url: str
    dir: Path

    @property
    def anchor(self) -> Path:
        return self.dir / "root.json"

    @property
    def metadata_dir(self) -> Path:
        return self.dir / "metadata"


def trust_dir(home: Path) -> Path:
    return Path(home) / "trust"


def check_root(data: bytes, source: str):
    """Parse root metadata and check that it is signed by its own root keys."""
    from tuf.api.metadata import Metadata, Root

    try:
        md = Metadata[Root].from_bytes(data)
        md.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
    except Exception as exc:
        raise RegistryError(f"{source}: not a valid, self-signed TUF root ({exc})") from None
    return md


def add(home: Path, name: str, location: str, root: bytes) -> Trusted:
    if not NAME_RE.match(name):
        raise RegistryError(f"registry name {name!r} is not valid (lowercase letters, digits, '-')")
    check_root(root, "root metadata")
    d = trust_dir(home) / name
    if d.exists():
        raise RegistryError(f"this target already trusts a registry named {name!r} "
                            f"({get(home, name).url}); nothing changed")
    tmp = trust_dir(home) / f".{name}.new"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "metadata").mkdir(parents=True)
    (tmp / "root.json").write_bytes(root)
    (tmp / "registry.json").write_text(json.dumps({"name": name, "url": to_url(location), "added": now_iso()},
                                                  indent=2) + "\n")
    tmp.rename(d)
    return get(home, name)


def get(home: Path, spec: str = LOCAL) -> Trusted:
    """A trusted registry by name, or by its location (directory or URL)."""
    entries = all_trusted(home)
    for entry in entries:
        if entry.name == spec:
            return entry
    if "/" in spec or "://" in spec:
        url = to_url(spec)
        for entry in entries:
            if entry.url == url:
                return entry
    known = ", ".join(f"{e.name} ({e.url})" for e in entries) or "none"
    raise RegistryError(f"this target does not trust a registry {spec!r} (trusted: {known}); "
                        f"add it with `lugh registry trust NAME LOCATION --root ROOT.json`")


def all_trusted(home: Path) -> list[Trusted]:
    base = trust_dir(home)
    out = []
    if base.is_dir():
        for d in sorted(base.iterdir()):
            info = d / "registry.json"
            if d.is_dir() and NAME_RE.match(d.name) and info.is_file():
                out.append(Trusted(name=d.name, url=json.loads(info.read_text())["url"], dir=d))
    return out
