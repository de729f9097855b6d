"""jobwarden: the process: config, store, supervisor, listeners, CLI and client."""

__version__ = "0.1.0"
