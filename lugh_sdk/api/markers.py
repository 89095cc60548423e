"""pluggy markers for the ``lugh`` hook namespace."""

import pluggy

PROJECT = "lugh"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
