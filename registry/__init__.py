"""The LughOS plugin registry: TUF metadata (python-tuf), vendor delegations, Ed25519
signing, publishing, and the target's verified view. One module per concern:

- :mod:`registry.keys`: Ed25519 keys in a key store (``LUGH_HOME/keys``);
- :mod:`registry.repo`: a registry directory and its signed metadata (operator side:
  init, vendors, revocation, key rotation, snapshot and timestamp);
- :mod:`registry.artifact`: a plugin wheel inspected as a release (both sides);
- :mod:`registry.publish`: a vendor's release into a registry (``publish()``);
- :mod:`registry.trust`: the registries a target trusts, and their roots;
- :mod:`registry.fetch`: fetching registry files from a directory or over http(s);
- :mod:`registry.client`: the target's verified view (python-tuf ``Updater``);
- :mod:`registry.local`: this machine's own registry (``LUGH_HOME/registry``).

The target's install transaction is :mod:`kernel.install`; docs/registry.md has the
format, the trust model and what is refused.
"""
