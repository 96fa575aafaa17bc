"""Exceptions that carry a one-line message meant for the user."""


class BnfoldError(Exception):
    """Base class of bnfold's errors; ``str(err)`` is one line for the user."""


class BadInput(BnfoldError):
    """The input cannot be processed: missing file, not ONNX, invalid model, bad option (exit 2)."""


class VerificationFailed(BnfoldError):
    """The transformed model does not compute the same outputs as the original (exit 1)."""


def one_line(err: BaseException) -> str:
    """An exception as one line for the user: its first line, or a file error's name and cause."""
    if isinstance(err, OSError) and err.filename and err.strerror:
        return f"{err.filename}: {err.strerror}"
    lines = str(err).strip().splitlines()
    return lines[0].strip() if lines else type(err).__name__
