"""One exception family for every user-facing failure.

The CLI turns a ``HavocError`` into a single ``error: ...`` line and exit status 2; anything
else is a bug and keeps its traceback.
"""


class HavocError(Exception):
    """Bad input: a message that names the file, the field, the expected and the found value."""


class ConfigError(HavocError, ValueError):
    """A model or training config that cannot be used as written."""


class CheckpointError(HavocError):
    """A checkpoint directory that is missing, broken or inconsistent with its config."""
