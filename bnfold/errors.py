"""Exceptions that carry a one-line message meant for the user."""


class BnfoldError(Exception):
    """Base class of bnfold's errors; ``str(err)`` is one line for the user."""


class BadInput(BnfoldError):
    """The input cannot be processed: missing file, not ONNX, invalid model, bad option (exit 2)."""


class VerificationFailed(BnfoldError):
    """The transformed model does not compute the same outputs as the original (exit 1)."""
