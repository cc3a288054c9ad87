"""Domain errors a user can cause. Each names the file (or key) and what is wrong.

The CLI turns any `SegError` into a one-line message and a non-zero exit.
"""

from __future__ import annotations


class SegError(Exception):
    """Base class for errors caused by user input (paths, files, params, checkpoints)."""


class DataError(SegError):
    """A dataset file is missing, corrupt, or inconsistent."""


class ConfigError(SegError):
    """A parameter or model option is unknown or impossible."""


class CheckpointError(SegError):
    """A checkpoint or weights file is missing or does not fit the model."""


class DiskFull(SegError):
    """A write ran out of space (ENOSPC, or EDQUOT): names the path; nothing was replaced."""


class DamagedCheckpoint(CheckpointError):
    """The file is there but is no whole checkpoint: truncated, empty, corrupted, foreign."""
