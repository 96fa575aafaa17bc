"""Exceptions that carry a one-line message meant for the user."""

from __future__ import annotations

import errno
import os
import signal
import tempfile


class BnfoldError(Exception):
    """Base class of bnfold's errors; ``str(err)`` is one line for the user."""


class BadInput(BnfoldError):
    """The input cannot be processed: missing file, not ONNX, invalid model, bad option (exit 2)."""


class VerificationFailed(BnfoldError):
    """The transformed model does not compute the same outputs as the original (exit 1)."""


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived: unwind (removing temporaries on the way) and exit with
    128 + the signal's number, 130 and 143. A BaseException, as KeyboardInterrupt is, so that
    no ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum

    def __str__(self) -> str:
        verb = "interrupted" if self.signum == signal.SIGINT else "terminated"
        return f"{verb} ({signal.Signals(self.signum).name}), temporary files removed"


def one_line(err: BaseException) -> str:
    """An exception as one line for the user: its first line, or a file error's name and cause."""
    if isinstance(err, OSError) and err.filename and err.strerror:
        return f"{err.filename}: {err.strerror}"
    lines = str(err).strip().splitlines()
    return lines[0].strip() if lines else type(err).__name__


def write_failure(err: OSError, path: str, directory: str, what: str = "") -> BadInput:
    """A failed write as one line naming the file and where it was written, and saying when
    that is TMPDIR (the usual surprise when a disk fills up)."""
    where = os.path.realpath(directory)
    tmp = os.path.realpath(tempfile.gettempdir())
    hint = ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT) and os.path.commonpath([where, tmp]) == tmp:
        hint = " (that is TMPDIR: set TMPDIR to a folder with room)"
    cause = err.strerror or str(err)
    return BadInput(f"{path}: cannot write {what + ' ' if what else ''}in {where}: "
                    f"{cause}{hint}")

