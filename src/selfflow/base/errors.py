"""Exceptions that the CLI turns into a one-line message instead of a traceback.

Every error a user can cause (a wrong file, a bad option, a missing download) derives
from :class:`SelfFlowError`; its message must say what was expected and what was found.
"""

from __future__ import annotations


class SelfFlowError(Exception):
    """An error caused by the user's input or environment, reported without a traceback."""


class CheckpointError(SelfFlowError):
    """A checkpoint file is missing, unreadable, or does not match the model."""


class DownloadError(SelfFlowError):
    """A file could not be fetched; the message says how to get it by hand."""


class ConfigurationError(SelfFlowError, ValueError):
    """An option or argument has a value that cannot work."""


class EvaluationError(SelfFlowError, ValueError):
    """A metric cannot be computed from the given features or statistics."""


class DatasetError(SelfFlowError):
    """A training dataset folder is missing, incomplete, damaged, or not a dataset at all."""


class CannotWriteError(SelfFlowError, OSError):
    """A file could not be written: a read-only folder, a full disk, a quota, no permission.

    Also an :class:`OSError` (with the original ``errno`` when one is known), so code that
    already tolerates a failed write (an optional cache) keeps catching it. Raised by
    :func:`selfflow.base.files.writing` with a message that names the file, the reason and, for a
    full disk, the free space; the finished files are kept, so the same command continues.
    """

    def __str__(self) -> str:
        # the message alone: OSError's own form ("[Errno 28] None: 'x'") once errno is set
        return str(self.args[0]) if self.args else ""


class DiskFullError(CannotWriteError):
    """The file system has no room for what is about to be written."""


class ReportedOnRankZero(SelfFlowError):
    """A multi-process set-up failed; rank 0 prints the reason, the other ranks only stop.

    (An output folder that not all nodes share is reported by each node's first process, as
    the other nodes' logs are elsewhere.)
    """
