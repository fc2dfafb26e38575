"""Staging folders that name their writer, so debris of a killed process can be told from work in progress.

Every artifact is written to a hidden sibling first and renamed into place when complete. A process
killed mid-write (SIGKILL, OOM) cannot clean up after itself, so the staging folder's name carries the
host and the pid of its writer: ``.<name>.staging-<host>-<pid>-<random>``. ``sweep_stale`` removes the
ones whose writer is gone, and only those: a folder of a live process (another run in the same project
right now) or of another host (a shared filesystem) is left alone.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MARK = ".staging-"
_NAME = re.compile(r"^\..+\.staging-(?P<host>[A-Za-z0-9_.-]*?)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def host_name() -> str:
    # The name goes into a folder name: keep it to characters that survive any filesystem.
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def make_staging_dir(parent: str | os.PathLike[str], name: str) -> Path:
    """A new, empty staging folder in ``parent`` (same filesystem, so ``os.replace`` into place is atomic)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}{MARK}{host_name()}-{os.getpid()}-", dir=parent))


@contextmanager
def staging_dir(parent: str | os.PathLike[str], name: str) -> Iterator[Path]:
    """A staging folder removed on exit; one left by a killed process is removed by ``sweep_stale``."""
    path = make_staging_dir(parent, name)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a killed child not yet reaped by its parent still answers kill(0)
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def is_stale(path: str | os.PathLike[str]) -> bool:
    """A staging folder of this host whose writing process is gone."""
    match = _NAME.match(Path(path).name)
    return bool(match) and match["host"] == host_name() and not pid_alive(int(match["pid"]))


def sweep_stale(root: str | os.PathLike[str], recursive: bool = True) -> list[Path]:
    """Remove the stale staging folders (and files) under ``root``; returns what was removed.

    ``recursive=False`` looks at ``root``'s own entries only (the system's temporary folder).
    """
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            if MARK in name and is_stale(Path(dirpath) / name):
                path = Path(dirpath) / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path)
        dirnames[:] = [d for d in dirnames if MARK not in d] if recursive else []
    return removed
