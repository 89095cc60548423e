"""The LughOS microkernel: the trusted computing base.

It manages real-time periodic tasks, routes every IPC message over pynng in three
priority lanes, grants memory budgets and shared-memory regions, and journals every
critical operation. It never imports plugin code: plugins run in service processes
(:mod:`kernel.services.host`).
"""

KERNEL_VERSION = "0.1.0"
