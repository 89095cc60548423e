"""LughOS SDK: the plugin API, the `lugh` command line and the client of a running kernel."""

__version__ = "0.1.0"
