"""A registry is a directory with TUF metadata, made and read with python-tuf's
Metadata API, and the release files it signs:

```
DIR/lugh-registry.json          {"format": 1}: marks the directory as a registry
DIR/metadata/N.root.json        every root version (clients walk the chain)
DIR/metadata/N.targets.json     top-level targets: one delegation per vendor
DIR/metadata/N.<vendor>.json    a vendor's releases, signed by the vendor's key
DIR/metadata/N.snapshot.json    the version of every targets role
DIR/metadata/timestamp.json     the current snapshot (short expiry)
DIR/metadata/<role>.json        copies of the newest versions, for people and tools
DIR/targets/<name>/<sha256>.<wheel file>
```

Consistent snapshots (TUF): every file a client fetches besides timestamp.json has its
version (metadata) or hash (targets) in its name and is never rewritten, and
timestamp.json is replaced last, in one rename. A client reading while a release is
being published sees the old registry or the new one, never a mix; the same tree
served by any static web server is a remote registry.

Roles and keys: root, targets, snapshot and timestamp each have one Ed25519 key
(threshold 1) in the operator's key store (``LUGH_HOME/keys``). The targets role
delegates to one role per vendor, named after the vendor, trusted for the vendor's key
only and only for target paths ``<package pattern>/*``: a vendor cannot sign a release
of a package outside its names. Revoking a vendor removes its delegation; its role stays
listed in the snapshot (clients refuse a snapshot that drops a role they have seen),
and the top-level targets metadata keeps a signed record of the revocation
(``x-lugh-revoked``) so that clients can say why a package disappeared.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

from registry.errors import RegistryError
from registry.keys import KeyStore, now_iso

FORMAT = 1
MARKER = "lugh-registry.json"
TOP_ROLES = ("root", "targets", "snapshot", "timestamp")
EXPIRY_DAYS = {"root": 365, "targets": 365, "snapshot": 30, "timestamp": 7, "vendor": 365}
REVOKED = "x-lugh-revoked"
VENDOR_RE = re.compile(r"^[a-z][a-z0-9-]{1,63}$")
PATTERN_RE = re.compile(r"^[a-z0-9*?\[\]-]{1,64}$")


def expiry(role: str, days: float | None = None) -> datetime:
    days = EXPIRY_DAYS.get(role, EXPIRY_DAYS["vendor"]) if days is None else days
    return datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=days)


def target_path(name: str, filename: str) -> str:
    """The TUF target path of a release: ``<package name>/<wheel file name>``."""
    return f"{name}/{filename}"


def patterns_of(role) -> list[str]:
    """The package patterns of a vendor delegation (its paths without ``/*``)."""
    return [p[:-2] if p.endswith("/*") else p for p in (role.paths or [])]


def check_vendor_name(name: str) -> None:
    if not VENDOR_RE.match(name) or name in TOP_ROLES:
        raise RegistryError(f"vendor name {name!r} is not valid (lowercase letters, digits and '-', "
                            f"not one of {', '.join(TOP_ROLES)})")


def check_patterns(patterns: list[str]) -> None:
    if not patterns:
        raise RegistryError("give at least one package pattern (--packages), e.g. 'acme-*'")
    for p in patterns:
        if not PATTERN_RE.match(p):
            raise RegistryError(f"package pattern {p!r} is not valid: lowercase names with '*', '?' or [..]")


class Repository:
    """The publisher's view of a registry directory (it signs; clients verify with
    :mod:`registry.client`)."""

    def __init__(self, path: Path, store: KeyStore):
        self.path = Path(path).resolve()
        self.meta_dir = self.path / "metadata"
        self.targets_dir = self.path / "targets"
        self.store = store

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: Path, store: KeyStore) -> "Repository":
        repo = cls(path, store)
        if not (repo.path / MARKER).is_file() or not (repo.meta_dir / "root.json").is_file():
            raise RegistryError(f"{path} is not a registry (create one with `lugh registry init {path}`)")
        return repo

    @classmethod
    def create(cls, path: Path, store: KeyStore, key_prefix: str) -> "Repository":
        """A new, empty registry: fresh keys for the four top-level roles, named
        ``<key_prefix>-<role>`` in ``store``."""
        from tuf.api.metadata import Delegations, Metadata, Root, Snapshot, Targets, Timestamp

        repo = cls(path, store)
        if repo.path.exists() and any(repo.path.iterdir()):
            raise RegistryError(f"{path} exists and is not empty; nothing changed")
        names = {role: store.fresh_name(f"{key_prefix}-{role}") for role in TOP_ROLES}
        root = Metadata(Root(expires=expiry("root"), consistent_snapshot=True))
        for role, name in names.items():
            store.new(name)
            root.signed.add_key(store.public_key(name), role)
        repo.meta_dir.mkdir(parents=True, exist_ok=True)
        repo.targets_dir.mkdir(exist_ok=True)
        repo.sign(root, "root", root=root.signed)
        repo._write(root, "root")
        targets = Metadata(Targets(expires=expiry("targets")))
        targets.signed.delegations = Delegations(keys={}, roles={})
        repo.sign(targets, "targets", root=root.signed)
        repo._write(targets, "targets")
        snapshot = Metadata(Snapshot(expires=expiry("snapshot")))
        timestamp = Metadata(Timestamp(expires=expiry("timestamp")))
        repo._write_snapshot_and_timestamp(snapshot, timestamp, root.signed, {"targets": targets})
        marker = {"format": FORMAT, "created": now_iso(), "key_prefix": key_prefix}
        (repo.path / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        return repo

    # ------------------------------------------------------------------ reading

    def load(self, role: str):
        from tuf.api.metadata import Metadata

        path = self.meta_dir / f"{role}.json"
        if not path.is_file():
            raise RegistryError(f"{self.path}: no metadata for role {role!r}")
        return Metadata.from_file(str(path))

    def key_prefix(self) -> str:
        return json.loads((self.path / MARKER).read_text()).get("key_prefix", "registry")

    def vendors(self) -> dict:
        """Vendor name -> its DelegatedRole (paths, keyids)."""
        delegations = self.load("targets").signed.delegations
        return dict(delegations.roles) if delegations and delegations.roles else {}

    def revoked(self) -> dict:
        return dict(self.load("targets").signed.unrecognized_fields.get(REVOKED, {}))

    def vendor(self, name: str):
        role = self.vendors().get(name)
        if role is None:
            if name in self.revoked():
                raise RegistryError(f"vendor {name!r} was revoked from {self.path}; nothing was published")
            raise RegistryError(f"{self.path} has no vendor {name!r} (add one with `lugh registry add-vendor`)")
        return role

    # ------------------------------------------------------------------ signing and writing

    def sign(self, md, role: str, *, root=None, extra_keyids=()) -> None:
        """Sign ``md`` (replacing its signatures) with this store's keys for ``role``."""
        keyids, threshold = self._keyids(role, root)
        signers = []
        for keyid in list(keyids) + [k for k in extra_keyids if k not in keyids]:
            signer = self.store.signer_for(keyid)
            if signer is not None:
                signers.append(signer)
        if sum(1 for s in signers if s.public_key.keyid in keyids) < threshold:
            raise RegistryError(f"cannot sign {role} metadata: its key ({', '.join(k[:12] for k in keyids)}) "
                                f"is not in {self.store.path}")
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)

    def _keyids(self, role: str, root=None) -> tuple[list[str], int]:
        if role in TOP_ROLES:
            root = root or self.load("root").signed
            r = root.roles[role]
            return list(r.keyids), r.threshold
        r = self.vendor(role)
        return list(r.keyids), r.threshold

    def _write(self, md, role: str) -> bytes:
        """Write ``<version>.<role>.json`` (never rewritten) and the ``<role>.json``
        copy; timestamp.json only unversioned. Each file lands in one rename."""
        from tuf.api.serialization.json import JSONSerializer

        data = md.to_bytes(JSONSerializer(compact=False))
        if role != "timestamp":
            _atomic_write(self.meta_dir / f"{md.signed.version}.{role}.json", data)
        _atomic_write(self.meta_dir / f"{role}.json", data)
        return data

    def _write_snapshot_and_timestamp(self, snapshot, timestamp, root, changed: dict) -> None:
        """New snapshot and timestamp versions covering ``changed`` roles (already
        bumped and signed), written in the order that keeps readers consistent:
        changed roles, then the snapshot, then timestamp.json last."""
        from tuf.api.metadata import MetaFile

        for role, md in changed.items():
            self._write(md, role)
            snapshot.signed.meta[f"{role}.json"] = MetaFile(version=md.signed.version)
        snapshot.signed.version += 1
        snapshot.signed.expires = expiry("snapshot")
        self.sign(snapshot, "snapshot", root=root)
        data = self._write(snapshot, "snapshot")
        timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version, length=len(data),
                                                  hashes={"sha256": hashlib.sha256(data).hexdigest()})
        timestamp.signed.version += 1
        timestamp.signed.expires = expiry("timestamp")
        self.sign(timestamp, "timestamp", root=root)
        self._write(timestamp, "timestamp")

    def commit(self, changed: dict) -> None:
        """Write bumped, signed ``changed`` roles, then a new snapshot and timestamp."""
        self._write_snapshot_and_timestamp(self.load("snapshot"), self.load("timestamp"), None, changed)

    def refresh(self, min_days: float = 0.0) -> bool:
        """Re-sign snapshot and timestamp with fresh expiry dates (the timestamp's is
        short so that a frozen registry is noticed). With ``min_days``, only if the
        timestamp expires within that many days. True if re-signed."""
        timestamp = self.load("timestamp")
        if min_days and timestamp.signed.expires > datetime.now(timezone.utc) + timedelta(days=min_days):
            return False
        self._write_snapshot_and_timestamp(self.load("snapshot"), timestamp, None, {})
        return True

    @contextlib.contextmanager
    def lock(self):
        """One writer at a time (publish, add-vendor, ...)."""
        with open(self.path / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield self
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ vendors

    def add_vendor(self, name: str, key, patterns: list[str]) -> dict:
        """Delegate ``<pattern>/*`` for each pattern to vendor ``name``, trusted for
        ``key`` (an SSlibKey, the vendor's public key) only. The vendor's own role
        metadata appears with its first release (:mod:`registry.publish`), signed by
        the vendor; the operator never needs the vendor's private key."""
        from tuf.api.metadata import DelegatedRole

        check_vendor_name(name)
        check_patterns(patterns)
        with self.lock():
            targets = self.load("targets")
            roles = targets.signed.delegations.roles
            if name in roles:
                raise RegistryError(f"vendor {name!r} already exists in {self.path}; nothing changed")
            for other, role in roles.items():
                clash = set(patterns) & set(patterns_of(role))
                if clash:
                    raise RegistryError(f"package pattern {', '.join(sorted(clash))} already belongs to vendor "
                                        f"{other!r}; nothing changed")
            roles[name] = DelegatedRole(name=name, keyids=[], threshold=1, terminating=True,
                                        paths=[f"{p}/*" for p in patterns])
            targets.signed.add_key(key, name)
            revoked = targets.signed.unrecognized_fields.get(REVOKED, {})
            revoked.pop(name, None)
            if not revoked:
                targets.signed.unrecognized_fields.pop(REVOKED, None)
            _bump(targets, "targets")
            self.sign(targets, "targets")
            self.commit({"targets": targets})
        return {"vendor": name, "keyid": key.keyid, "packages": patterns}

    def add_packages(self, name: str, patterns: list[str]) -> dict:
        """Extend vendor ``name``'s delegation with more package patterns."""
        check_patterns(patterns)
        with self.lock():
            targets = self.load("targets")
            role = targets.signed.delegations.roles.get(name)
            if role is None:
                raise RegistryError(f"{self.path} has no vendor {name!r}; nothing changed")
            for other, r in targets.signed.delegations.roles.items():
                clash = set(patterns) & set(patterns_of(r)) if other != name else set()
                if clash:
                    raise RegistryError(f"package pattern {', '.join(sorted(clash))} already belongs to vendor "
                                        f"{other!r}; nothing changed")
            role.paths = role.paths + [f"{p}/*" for p in patterns if f"{p}/*" not in role.paths]
            _bump(targets, "targets")
            self.sign(targets, "targets")
            self.commit({"targets": targets})
        return {"vendor": name, "packages": patterns_of(role)}

    def vendor_metadata(self, name: str):
        """The vendor's role metadata, or a new empty one (version after any seen)."""
        from tuf.api.metadata import Metadata, Targets

        snapshot = self.load("snapshot")
        listed = snapshot.signed.meta.get(f"{name}.json")
        path = self.meta_dir / f"{name}.json"
        if listed is not None and path.is_file():
            md = self.load(name)
            if md.signed.version == listed.version:
                return md
        md = Metadata(Targets(expires=expiry("vendor")))
        md.signed.version = listed.version if listed else 0  # the caller bumps it before signing
        return md

    def revoke_vendor(self, name: str) -> dict:
        with self.lock():
            targets = self.load("targets")
            roles = targets.signed.delegations.roles
            role = roles.get(name)
            if role is None:
                raise RegistryError(f"{self.path} has no vendor {name!r}; nothing changed")
            for keyid in list(role.keyids):
                targets.signed.revoke_key(keyid, name)
            del roles[name]
            revoked = targets.signed.unrecognized_fields.setdefault(REVOKED, {})
            revoked[name] = {"at": now_iso(), "keyids": list(role.keyids), "packages": patterns_of(role)}
            _bump(targets, "targets")
            self.sign(targets, "targets")
            self.commit({"targets": targets})
        return {"vendor": name, "revoked": True, "packages": patterns_of(role)}

    # ------------------------------------------------------------------ key rotation

    def rotate_key(self, role: str, key_name: str | None = None) -> dict:
        """Replace ``role``'s key with a new one (``key_name`` in the store, created
        if not given) and re-sign what it signs. Rotating root signs the new root with
        the old and the new key, as clients require to follow the chain."""
        with self.lock():
            if role in TOP_ROLES:
                return self._rotate_top(role, key_name)
            return self._rotate_vendor(role, key_name)

    def _new_key(self, base: str, key_name: str | None):
        if key_name is None:
            key_name = self.store.fresh_name(base)
            self.store.new(key_name)
        self.store.private_path(key_name)  # the new key must be able to sign
        return key_name, self.store.public_key(key_name)

    def _rotate_top(self, role: str, key_name: str | None) -> dict:
        root = self.load("root")
        old_ids = list(root.signed.roles[role].keyids)
        old_root_ids = list(root.signed.roles["root"].keyids)
        name, key = self._new_key(f"{self.key_prefix()}-{role}", key_name)
        if key.keyid in old_ids:
            raise RegistryError(f"{name} is already the {role} key; nothing changed")
        for keyid in old_ids:
            root.signed.revoke_key(keyid, role)
        root.signed.add_key(key, role)
        _bump(root, "root")
        self.sign(root, "root", root=root.signed, extra_keyids=old_root_ids if role == "root" else ())
        self._write(root, "root")
        changed = {}
        if role == "targets":
            targets = self.load("targets")
            _bump(targets, "targets")
            self.sign(targets, "targets", root=root.signed)
            changed["targets"] = targets
        self._write_snapshot_and_timestamp(self.load("snapshot"), self.load("timestamp"), root.signed, changed)
        return {"role": role, "key": name, "keyid": key.keyid, "root_version": root.signed.version}

    def _rotate_vendor(self, vendor: str, key_name: str | None) -> dict:
        old = self.vendor(vendor)
        name, key = self._new_key(vendor, key_name)
        if key.keyid in old.keyids:
            raise RegistryError(f"{name} is already {vendor}'s key; nothing changed")
        targets = self.load("targets")
        for keyid in list(old.keyids):
            targets.signed.revoke_key(keyid, vendor)
        targets.signed.add_key(key, vendor)
        _bump(targets, "targets")
        self.sign(targets, "targets")
        role_md = self.vendor_metadata(vendor)
        _bump(role_md, "vendor")
        role_md.signatures.clear()
        role_md.sign(self.store.signer(name))
        self.commit({"targets": targets, vendor: role_md})
        return {"role": vendor, "key": name, "keyid": key.keyid}


def _bump(md, role: str) -> None:
    md.signed.version += 1
    md.signed.expires = expiry(role)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
