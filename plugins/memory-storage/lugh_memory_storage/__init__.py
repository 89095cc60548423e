"""In-memory storage backend plugin for LughOS.

Nothing is imported here: a host may open this package to read lugh-plugin.toml
before it has verified the plugin, and that must not run plugin code. The entry
point names lugh_memory_storage.plugin:MemoryStorage directly.
"""
