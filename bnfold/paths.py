"""The paths a user names, resolved: where a path writes to (through symlinks), whether two
paths are the same file, and the file system's limit on a name."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from bnfold.errors import BadInput


@dataclass(frozen=True)
class Target:
    """A path the user named, resolved: `real` is where the bytes go (symlinks followed)."""

    given: str
    real: str
    special: bool  # an existing FIFO, device or socket: written directly, never replaced

    @property
    def directory(self) -> str:
        return os.path.dirname(self.real)

    @property
    def name(self) -> str:
        return os.path.basename(self.real)


def resolve(path: str | os.PathLike, option: str = "") -> Target:
    """Where `path` writes to; BadInput (one line, naming it) if bnfold cannot write there."""
    given = os.fspath(path)
    label = f"{option} {given}".strip()
    if not given:
        raise BadInput(f"{option} '': empty file name".strip())
    try:
        st = os.stat(given)  # through symlinks, /dev/stdout's /proc links too
    except FileNotFoundError:
        st = None
    except OSError as err:  # a symlink loop, a component that is not a folder
        raise BadInput(f"{label}: {err.strerror}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise BadInput(f"{label}: is a directory")
    if st is not None and not stat.S_ISREG(st.st_mode):
        return Target(given, given, special=True)
    target = Target(given, os.path.realpath(given), special=False)
    if not os.path.isdir(target.directory):
        raise BadInput(f"{label}: directory {target.directory} does not exist")
    if not os.access(target.directory, os.W_OK | os.X_OK):
        raise BadInput(f"{label}: directory {target.directory} is not writable")
    return target


def identity(path: str | os.PathLike) -> tuple:
    """What makes two paths the same file: device and inode when it exists (hard links,
    symlinks, `..` all agree), else the resolved path."""
    try:
        st = os.stat(path)
        return (st.st_dev, st.st_ino)
    except OSError:
        return (os.path.realpath(path),)


def truncate(name: str, size: int) -> str:
    """`name` cut to `size` bytes at most (file names are limited in bytes, not characters)."""
    raw = os.fsencode(name)
    return name if len(raw) <= size else os.fsdecode(raw[:size])


def name_max(directory: str) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255
