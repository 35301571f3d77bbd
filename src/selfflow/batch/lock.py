"""The folder lock's old home: it lives in :mod:`selfflow.base.lock`, beside the other base helpers,
because ``sample``, ``prepare`` and ``train`` all take it. Kept so that old imports still work;
the package itself imports :mod:`selfflow.base.lock`."""

from selfflow.base.lock import (  # noqa: F401
    LOCK_NAME,
    FolderBusyError,
    FolderLock,
    busy_error,
    lock_holder,
)
