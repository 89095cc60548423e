"""Round-robin scheduler plugin for LughOS.

Nothing is imported here: a host may open this package to read lugh-plugin.toml
before it has verified the plugin, and that must not run plugin code. The entry
point names lugh_round_robin_scheduler.plugin:RoundRobinScheduler directly.
"""
