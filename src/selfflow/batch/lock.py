"""The folder lock's old home: it lives in :mod:`selfflow.lock`, beside the other base helpers,
because ``sample``, ``prepare`` and ``train`` all take it. Kept so that old imports still work;
the package itself imports :mod:`selfflow.lock`."""

from selfflow.lock import (  # noqa: F401
    LOCK_NAME,
    FolderBusyError,
    FolderLock,
    busy_error,
    lock_holder,
)
