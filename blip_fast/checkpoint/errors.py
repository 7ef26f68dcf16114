"""The errors checkpoint loading raises; each message names the file and the key at fault."""

__all__ = ["CheckpointError", "UnsafeCheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the problem."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle holding objects other than tensors / plain containers (it could run code)."""
