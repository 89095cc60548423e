"""The registry's one error type. It is a :class:`kernel.plugin_store.PluginError`: a
release that must not be published or installed, with a message saying why, which the
control channel and the CLI show as one line."""

from __future__ import annotations

from kernel.plugin_store import PluginError


class RegistryError(PluginError):
    """Refused: the message says what was needed and what was found."""
