"""Errors the tools report as one clear line instead of a traceback."""


class ConfigError(ValueError):
    """A config value or a data source that cannot work; the message names the key."""
