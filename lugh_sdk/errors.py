"""Errors the CLI shows as one clear line (no traceback). Kept apart from the client so
that `lugh --help` does not import pynng."""


class LughError(Exception):
    """A user-facing error."""


class NotRunning(LughError):
    """No kernel answers for this home."""
