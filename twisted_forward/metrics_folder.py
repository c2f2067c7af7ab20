"""
The folder where ``--workers`` keep their Prometheus series, and the sweep of
folders left behind by a supervisor that was killed.

prometheus_client's multiprocess mode keeps every worker's series in files
under one folder (:data:`twisted_forward.metrics.MULTIPROC_ENV`).  The
supervisor makes a fresh one at each start, in the system's temporary folder
(``TMPDIR``), and removes it when it stops.  A supervisor that is killed
(SIGKILL, the OOM killer, a power cut on a persistent ``/tmp``) cannot remove
it, so each folder holds an ``owner.lock`` file that its supervisor keeps
locked (``flock``) while it runs.  The kernel drops the lock when the process
dies, however it dies, so the next supervisor to start removes every folder
whose lock it can take.  A lock, not a pid: a pid can be reused by another
process, a lock cannot outlive its holder.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from typing import Optional

#: Every folder's name starts with this.
PREFIX = "twisted-forward-metrics-"
#: A folder being made (before its lock is held) starts with this.
STAGING = "." + PREFIX
#: The file its owner keeps locked.
LOCK_FILE = "owner.lock"


class MetricsFolder:
    """A multiprocess metrics folder that this process owns while it lives.

    :ivar path: the folder.
    """

    def __init__(self, path: str, lock_fd: int) -> None:
        self.path = path
        self._lock_fd: Optional[int] = lock_fd

    @classmethod
    def create(cls, parent: Optional[str] = None) -> "MetricsFolder":
        """Make a new folder under ``parent`` (default: the system's
        temporary folder), locked before it gets the name a sweep looks at.

        :raises OSError: when it cannot be made.
        """
        parent = parent if parent is not None else tempfile.gettempdir()
        staging = tempfile.mkdtemp(prefix=STAGING, dir=parent)
        fd = os.open(
            os.path.join(staging, LOCK_FILE),
            os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600,
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, b"%d\n" % os.getpid())
            path = os.path.join(parent, PREFIX + os.path.basename(staging)[len(STAGING):])
            os.rename(staging, path)
        except OSError:
            os.close(fd)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return cls(path, fd)

    def remove(self) -> None:
        """Remove the folder, then let go of its lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def sweep(parent: Optional[str] = None) -> list[str]:
    """Remove every metrics folder under ``parent`` whose owner is gone
    (its lock can be taken); returns the folders removed.

    Folders of running supervisors (locked), folders without a lock file
    (not made by this code) and folders this user may not open are left
    alone.
    """
    parent = parent if parent is not None else tempfile.gettempdir()
    removed: list[str] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in sorted(names):
        # (Not STAGING ones: a supervisor may be making one right now.)
        if not name.startswith(PREFIX):
            continue
        path = os.path.join(parent, name)
        try:
            fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its owner runs
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed
