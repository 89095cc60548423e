"""Ed25519 signing keys (cryptography), kept in a key store directory: by default
``LUGH_HOME/keys``, mode 0700.

Each key is two files: ``NAME.key``, the private key (PEM, PKCS#8), created with mode
0600 and never printed by any command; and ``NAME.pub``, its public key (PEM,
SubjectPublicKeyInfo), what ``lugh keys export`` prints and what a registry operator
is given (``lugh registry add-vendor NAME --key FILE``). A key is known to TUF by its
key id (securesystemslib's: sha256 of the canonical public key record); the registry
finds the private key for a role by that id.

The private key is not encrypted at rest (as an ssh key without a passphrase): its
protection is the file mode. docs/registry.md says so.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from registry.errors import RegistryError

KEY_NAME_RE = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class KeyInfo:
    name: str
    keyid: str
    public_path: Path
    private: bool  # the private key is in this store
    created: float


def sslib_key(public: Ed25519PublicKey):
    from securesystemslib.signer import SSlibKey

    return SSlibKey.from_crypto(public)


def public_from_pem(pem: bytes, source: str = "public key"):
    """An SSlibKey from a PEM public key; only Ed25519 is accepted."""
    try:
        public = serialization.load_pem_public_key(pem)
    except ValueError:
        raise RegistryError(f"{source}: not a PEM public key") from None
    if not isinstance(public, Ed25519PublicKey):
        raise RegistryError(f"{source}: vendor keys must be Ed25519, found {type(public).__name__}")
    return sslib_key(public)


def signer_from_file(path: Path):
    """A securesystemslib CryptoSigner for the private key in ``path``."""
    from securesystemslib.signer import CryptoSigner

    try:
        private = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise RegistryError(f"no private key at {path}") from None
    except (ValueError, TypeError):
        raise RegistryError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise RegistryError(f"{path}: signing keys must be Ed25519, found {type(private).__name__}")
    return CryptoSigner(private, sslib_key(private.public_key()))


class KeyStore:
    def __init__(self, path: Path):
        self.path = Path(path)

    def _ensure_dir(self) -> None:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)

    def _check_name(self, name: str) -> None:
        if not KEY_NAME_RE.match(name):
            raise RegistryError(f"key name {name!r} is not valid (lowercase letters, digits, '.', '_', '-')")

    def new(self, name: str) -> KeyInfo:
        """Create a key pair; refuses to replace an existing key."""
        self._check_name(name)
        self._ensure_dir()
        private = Ed25519PrivateKey.generate()
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        try:
            fd = os.open(self.path / f"{name}.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise RegistryError(f"a key named {name!r} already exists in {self.path}; nothing changed") from None
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        (self.path / f"{name}.pub").write_bytes(public)
        return self.info(name)

    def info(self, name: str) -> KeyInfo:
        pub = self.path / f"{name}.pub"
        if not pub.is_file():
            raise RegistryError(f"no key named {name!r} in {self.path} (create one with `lugh keys new {name}`)")
        key = public_from_pem(pub.read_bytes(), str(pub))
        return KeyInfo(name=name, keyid=key.keyid, public_path=pub, private=(self.path / f"{name}.key").is_file(),
                       created=pub.stat().st_mtime)

    def list(self) -> list[KeyInfo]:
        if not self.path.is_dir():
            return []
        return [self.info(p.stem) for p in sorted(self.path.glob("*.pub")) if KEY_NAME_RE.match(p.stem)]

    def exists(self, name: str) -> bool:
        return (self.path / f"{name}.pub").is_file()

    def public_pem(self, name: str) -> str:
        self._check_name(name)
        return self.info(name).public_path.read_text()

    def public_key(self, name: str):
        return public_from_pem(self.public_pem(name).encode(), name)

    def private_path(self, name: str) -> Path:
        path = self.path / f"{name}.key"
        if not path.is_file():
            raise RegistryError(f"the private key of {name!r} is not in {self.path}")
        return path

    def signer(self, name: str):
        return signer_from_file(self.private_path(name))

    def signer_for(self, keyid: str):
        """The signer whose public key has ``keyid``, or None if this store lacks it."""
        for info in self.list():
            if info.keyid == keyid and info.private:
                return self.signer(info.name)
        return None

    def fresh_name(self, base: str) -> str:
        """``base``, or ``base-2``, ``base-3``... whichever is not taken yet."""
        name, n = base, 1
        while self.exists(name):
            n += 1
            name = f"{base}-{n}"
        return name


def keystore(home: Path) -> KeyStore:
    return KeyStore(Path(home) / "keys")


def load_public(spec: str, store: KeyStore | None = None):
    """A public key given as a PEM file path or as the name of a key in ``store``."""
    path = Path(spec).expanduser()
    if path.is_file():
        return public_from_pem(path.read_bytes(), str(path))
    if store is not None and KEY_NAME_RE.match(spec) and store.exists(spec):
        return store.public_key(spec)
    raise RegistryError(f"{spec!r} is neither a public key file nor a key in {store.path if store else 'the key store'}")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
