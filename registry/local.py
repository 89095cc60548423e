"""The machine's own registry, ``LUGH_HOME/registry``: a registry like any other,
created on first use with keys made for this machine, and trusted by this machine's
target under the name ``local``. First-party plugins are published into it by the
same path as any vendor's releases (:mod:`lugh_sdk.firstparty`); a vendor developing
on this machine can publish into it too (``lugh publish``, default registry).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import shutil
from pathlib import Path

from registry import trust

KEY_PREFIX = "local"


def registry_dir(home: Path) -> Path:
    return Path(home) / "registry"


def ensure(home: Path):
    """The local registry (a :class:`registry.repo.Repository`), created and trusted
    if this machine has none yet; its snapshot and timestamp re-signed when they would
    expire within a day."""
    from registry.keys import keystore
    from registry.repo import MARKER, Repository

    home = Path(home)
    store = keystore(home)
    d = registry_dir(home)
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".registry.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (d / MARKER).is_file():
            tmp = d.with_name(".registry.new")
            shutil.rmtree(tmp, ignore_errors=True)
            Repository.create(tmp, store, KEY_PREFIX)
            if d.exists():
                d.rmdir()  # an empty directory someone made; a non-empty one makes rename fail loudly
            tmp.rename(d)
        repo = Repository.open(d, store)
        try:
            trust.get(home, trust.LOCAL)
        except trust.RegistryError:
            trust.add(home, trust.LOCAL, str(d), (d / "metadata" / "1.root.json").read_bytes())
        with repo.lock():
            repo.refresh(min_days=1)
    return repo


def ensure_vendor(home: Path, vendor: str, patterns: list[str], key_name: str) -> Path:
    """A vendor of the local registry whose key is this machine's ``key_name``
    (created if needed); returns the private key's path."""
    from registry.repo import patterns_of

    repo = ensure(home)
    store = repo.store
    if not store.exists(key_name):
        store.new(key_name)
    key = store.public_key(key_name)
    vendors = repo.vendors()
    if vendor not in vendors:
        repo.add_vendor(vendor, key, patterns)
    elif key.keyid not in vendors[vendor].keyids:
        raise trust.RegistryError(f"vendor {vendor!r} of {repo.path} is not signed for by key {key_name!r}")
    else:
        missing = [p for p in patterns if p not in patterns_of(vendors[vendor])]
        if missing:
            repo.add_packages(vendor, missing)
    return store.private_path(key_name)


def needs_refresh(home: Path, days: float = 1.0) -> bool:
    """Whether the local registry is missing or its timestamp expires within ``days``
    (read as plain JSON, so that the common case does not import TUF)."""
    path = registry_dir(home) / "metadata" / "timestamp.json"
    try:
        expires = json.loads(path.read_text())["signed"]["expires"]
        left = datetime.datetime.fromisoformat(expires.replace("Z", "+00:00")) - datetime.datetime.now(datetime.UTC)
    except (OSError, ValueError, KeyError):
        return True
    return left.total_seconds() < days * 86400
