"""System services: each runs in its own process.

- :mod:`kernel.services.host`: the generic service host (entry point of every
  plugin-hosting service process), which verifies and loads exactly one plugin;
- :mod:`kernel.services.loop`: the generic message loop shared by every peer process;
- :mod:`kernel.services.scheduler`, :mod:`.storage`, :mod:`.monitor`: the kind-specific
  part, mapping messages to the plugin's hooks;
- :mod:`kernel.services.rs`: the reincarnation server;
- :mod:`kernel.services.worker`: the process that executes jobs.
"""
