"""What a target must refuse when it installs from a registry: each case is refused
with a clear message, and nothing on the target changes (its installed plugins, pins,
configuration, staging: every file of its home but the journal and, where the metadata
itself verified, the cache of verified metadata). The journal gains no install record.

The verified-metadata cache (``trust/<registry>/metadata``) follows TUF: what verifies
is kept (that is what detects a later rollback or freeze), what is refused never is;
each metadata attack checks that the refused file did not reach the cache.

The target here is a home with no kernel running (:class:`kernel.install.OfflineTarget`):
the very code the kernel runs in its control thread for `lugh install`
(tests/test_registry.py drives the same path through a running kernel). The attacker
writes into the registry directory directly: a compromised server, mirror or key.
"""

from __future__ import annotations

import os
import zipfile

import pytest

from kernel import install, plugin_store
from kernel.plugin_store import PluginError
from registry.errors import RegistryError
from registry.keys import KeyStore
from wheelkit import make_world, snapshot, symlink_member


@pytest.fixture
def world(tmp_path):
    """A registry with vendor acme (acme-*), and a target that trusts it and has
    installed acme-base 1.0.0 from it (so it has seen the registry's metadata)."""
    w = make_world(tmp_path)
    w.publish(w.wheel("acme-base"))
    with install.OfflineTarget(w.target) as target:
        install.install(target, "acme-base", registry="test")
    return w


def refused(world, name, match, version=None, *, cache_keeps=()):
    """Install ``name`` on the target: it must be refused with ``match`` and leave the
    target exactly as it was; ``cache_keeps``: cached metadata files that must not
    change (the refused ones)."""
    cache = world.target / "trust" / "test" / "metadata"
    kept = {f: (cache / f).read_bytes() if (cache / f).exists() else None for f in cache_keeps}
    before = snapshot(world.target)
    with install.OfflineTarget(world.target) as target:
        records = len(target.journal.records())
        with pytest.raises(PluginError, match=match) as info:
            install.install(target, name, version, registry="test")
        assert [r["op"] for r in target.journal.records()[records:]] == []
    assert snapshot(world.target) == before
    assert {f: (cache / f).read_bytes() if (cache / f).exists() else None for f in cache_keeps} == kept
    assert plugin_store.installed(world.target) == {"acme-base": ["1.0.0"]}
    assert not list((world.target / "plugins").glob(".staging-*"))
    return str(info.value)


# --------------------------------------------------------------------------- the artifact

def test_tampered_wheel(world):
    world.publish(world.wheel("acme-x"))
    stored = next((world.registry / "targets" / "acme-x").glob("*.whl"))
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same length, one byte changed
    stored.write_bytes(bytes(data))
    msg = refused(world, "acme-x", "does not match its signed length or hash")
    assert "tampered" in msg


def test_wheel_longer_than_signed(world):
    world.publish(world.wheel("acme-x"))
    stored = next((world.registry / "targets" / "acme-x").glob("*.whl"))
    stored.write_bytes(stored.read_bytes() + b"appended")
    refused(world, "acme-x", "longer than its signed length")


def test_wheel_over_the_size_limit(world):
    big = world.wheels / "acme_big-1.0.0-py3-none-any.whl"
    big.parent.mkdir(parents=True, exist_ok=True)
    big.write_bytes(os.urandom(plugin_store.MAX_WHEEL_BYTES + 1))
    with pytest.raises(RegistryError, match="over the size limit"):
        world.publish(big)  # the publisher refuses it ...
    world.forge(big)  # ... a forger does not; the target refuses it before fetching a byte
    refused(world, "acme-big", "over the size limit")


def test_wheel_that_unpacks_over_the_size_limit(world):
    bomb = zipfile.ZipInfo("lugh_t_acme_bomb/zeros.bin", date_time=(2024, 1, 1, 0, 0, 0))
    bomb.compress_type = zipfile.ZIP_DEFLATED
    wheel = world.wheel("acme-bomb", extra=[(bomb, bytes(plugin_store.MAX_UNPACKED_BYTES + 1))])
    assert wheel.stat().st_size < plugin_store.MAX_WHEEL_BYTES
    world.forge(wheel)
    refused(world, "acme-bomb", "unpacks to more than")


@pytest.mark.parametrize("member, match", [
    (("../escape.py", b"print('out')"), "points outside the plugin's root"),
    (("/abs/escape.py", b"x"), "points outside the plugin's root"),
    (symlink_member("lugh_t_acme_x/link.py", "../../../../etc/passwd"), "is a symbolic link"),
])
def test_wheel_with_a_path_out_of_its_root_or_a_symlink(world, member, match):
    wheel = world.wheel("acme-x", extra=[member])
    with pytest.raises(PluginError, match=match):
        world.publish(wheel)
    world.forge(wheel)
    refused(world, "acme-x", match)


@pytest.mark.parametrize("kw, match", [
    ({"no_manifest": True}, "has no lugh-plugin.toml"),
    ({"manifest": "name = \n"}, "not valid TOML"),
    ({"manifest": 'name = "acme-x"\nversion = "1.0.0"\n'}, "missing kind"),
    ({"kind": "driver"}, "kind 'driver' is not one of"),
])
def test_malformed_or_missing_manifest(world, kw, match):
    wheel = world.wheel("acme-x", **kw)
    with pytest.raises(PluginError, match=match):
        world.publish(wheel)
    world.forge(wheel)
    refused(world, "acme-x", match)


def test_wheel_that_differs_from_its_signed_description(world):
    from registry import artifact

    honest = world.wheel("acme-x", "1.0.1")
    lying = world.wheel("acme-x", "1.0.1", api=">=0.1")  # signed below as if it were the honest one
    world.forge(lying, custom=artifact.inspect(honest).custom("acme"))
    refused(world, "acme-x", r"the wheel's api \('>=0.1'\) differs from the signed description \('>=1.0,<2'\)")


# --------------------------------------------------------------------------- keys and vendors

def test_signature_by_an_unknown_key(world, tmp_path):
    stranger = KeyStore(tmp_path / "stranger")
    stranger.new("mallory")
    with pytest.raises(RegistryError, match="is not vendor 'acme''s key"):
        world.publish(world.wheel("acme-x"), key=stranger.private_path("mallory"))
    world.forge(world.wheel("acme-x"), signer=stranger.signer("mallory"))
    msg = refused(world, "acme-x", "signed by an unknown or untrusted key", cache_keeps=["acme.json"])
    assert "acme" in msg


def test_revoked_vendor(world):
    world.publish(world.wheel("acme-x"))
    world.repo.revoke_vendor("acme")
    refused(world, "acme-x", "vendor 'acme', which published acme-x, was revoked")
    # Its key still signs, but no target trusts it any more.
    with pytest.raises(RegistryError, match="was revoked"):
        world.publish(world.wheel("acme-y"))


def test_vendor_publishing_outside_its_package_names(world):
    with pytest.raises(RegistryError, match=r"may publish only acme-\*; intruder is outside its names"):
        world.publish(world.wheel("intruder"))
    world.forge(world.wheel("intruder"))
    refused(world, "intruder", r"vendor 'acme' signed intruder, which is outside the names delegated to it \(acme-\*\)")


def test_vendor_publishing_another_vendors_package(world, tmp_path):
    beta = KeyStore(tmp_path / "beta")
    beta.new("beta")
    world.repo.add_vendor("beta", beta.public_key("beta"), ["beta-*"])
    world.publish(world.wheel("beta-x"), vendor="beta", key=beta.private_path("beta"))
    world.forge(world.wheel("beta-x", "9.0.0"))  # acme signs a "newer" beta-x
    refused(world, "beta-x", r"vendor 'acme' signed beta-x 9.0.0, which is outside", version="9.0.0")
    # and the newest beta-x a target finds is beta's own
    with install.OfflineTarget(world.target) as target:
        assert install.install(target, "beta-x", registry="test")["version"] == "1.0.0"


# --------------------------------------------------------------------------- metadata

def test_expired_metadata(world):
    from datetime import datetime, timedelta, timezone

    world.publish(world.wheel("acme-x"))
    repo = world.repo
    with repo.lock():
        timestamp = repo.load("timestamp")
        timestamp.signed.version += 1
        timestamp.signed.expires = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)
        repo.sign(timestamp, "timestamp")
        repo._write(timestamp, "timestamp")
    refused(world, "acme-x", "has expired", cache_keeps=["timestamp.json", "snapshot.json", "acme.json"])


def test_rollback_to_older_metadata(world):
    old = (world.registry / "metadata" / "timestamp.json").read_bytes()
    world.publish(world.wheel("acme-x"))
    with install.OfflineTarget(world.target) as target:
        install.install(target, "acme-x", registry="test")  # the target has seen the newer metadata
    install_state = plugin_store.installed(world.target)
    (world.registry / "metadata" / "timestamp.json").write_bytes(old)  # a mirror serves the old one
    world.publish(world.wheel("acme-y"))
    (world.registry / "metadata" / "timestamp.json").write_bytes(old)
    before = snapshot(world.target, with_trust=True)
    with install.OfflineTarget(world.target) as target:
        with pytest.raises(PluginError, match="older than what this target has already verified"):
            install.install(target, "acme-y", registry="test")
    assert snapshot(world.target, with_trust=True) == before
    assert plugin_store.installed(world.target) == install_state


def test_mixed_and_matched_metadata(world):
    world.publish(world.wheel("acme-x"))
    world.publish(world.wheel("acme-y"))
    meta = world.registry / "metadata"
    newest = max(int(p.name.split(".")[0]) for p in meta.glob("*.acme.json"))
    # the current snapshot names acme's newest role; serve the previous one under its name
    (meta / f"{newest}.acme.json").write_bytes((meta / f"{newest - 1}.acme.json").read_bytes())
    refused(world, "acme-y", "mixed-and-matched metadata", cache_keeps=["acme.json"])


def test_snapshot_that_does_not_match_the_timestamp(world):
    world.publish(world.wheel("acme-x"))
    meta = world.registry / "metadata"
    versions = sorted(int(p.name.split(".")[0]) for p in meta.glob("*.snapshot.json"))
    (meta / f"{versions[-1]}.snapshot.json").write_bytes((meta / f"{versions[-2]}.snapshot.json").read_bytes())
    refused(world, "acme-x", "mixed-and-matched|does not match its signed length or hash",
            cache_keeps=["snapshot.json", "acme.json"])


# --------------------------------------------------------------------------- compatibility and names

@pytest.mark.parametrize("over, match", [
    ({"api": ">=2.0,<3"}, r"needs plugin API >=2.0,<3; this kernel provides"),
    ({"architectures": ["riscv64"]}, r"supports riscv64; this target is"),
    ({"python": ">=4.0"}, r"needs Python >=4.0"),
    ({"kernel": ">=99.0"}, r"needs LughOS kernel >=99.0; this target runs"),
])
def test_incompatible_release_is_refused_before_download(world, over, match, monkeypatch):
    world.publish(world.wheel("acme-x", **over))  # a valid release, for other targets
    fetched = []
    from registry.client import Session

    monkeypatch.setattr(Session, "download", lambda *a, **k: fetched.append(a) or pytest.fail("downloaded"))
    refused(world, "acme-x", match)
    assert fetched == []


def test_a_name_the_registry_does_not_have(world):
    refused(world, "acme-nothing", "registry test has no package named 'acme-nothing'")
    refused(world, "zzz-unknown", "registry test has no package named 'zzz-unknown'")
    refused(world, "acme-base", r"has no version 2.0.0 of acme-base \(available: 1.0.0\)", version="2.0.0")


def test_an_untrusted_registry_is_refused(world):
    with install.OfflineTarget(world.target) as target:
        with pytest.raises(PluginError, match="does not trust a registry 'elsewhere'"):
            install.install(target, "acme-base", registry="elsewhere")
