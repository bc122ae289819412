"""Exceptions the library raises for bad input; the CLI prints their message and exits 1."""


class DefuseError(Exception):
    """Bad input or a broken artifact; the message names the file, sample or parameter."""


class ConfigError(DefuseError, ValueError):
    """A parameter is missing, unknown or out of range."""


class DataError(DefuseError):
    """An image folder, manifest or image that cannot be used as given."""


class CacheError(DefuseError):
    """A feature cache that is missing, corrupt or inconsistent with its inputs."""


class CheckpointError(DefuseError):
    """A checkpoint, weights file or fitted head that cannot be used as given."""
