"""`bnfold verify`: do two models compute the same outputs?"""

from __future__ import annotations

import click

from bnfold.cli.common import (Command, check_writable, emit, exit_failed, parse_dims,
                               progress_reporter, verify_options)
from bnfold.io import load
from bnfold.verify import verify


@click.command("verify", cls=Command)
@click.argument("reference", metavar="A")
@click.argument("candidate", metavar="B")
@verify_options
def verify_command(reference: str, candidate: str, inputs: str | None, dims: tuple[str, ...],
                   atol: float | None, rtol: float | None, seed: int, json_path: str | None,
                   quiet: bool) -> None:
    """Check that models A and B compute the same outputs.

    Both run in onnxruntime, unoptimised, on the same inputs. Exit code 0 if every output
    agrees, 1 if not.
    """
    sizes = parse_dims(dims)
    if json_path:
        check_writable(json_path)
    progress = progress_reporter(quiet)
    for path in (reference, candidate):  # clear errors for unusable files
        load(path, progress=progress)
    progress("verifying")
    result = verify(reference, candidate, inputs=inputs, dims=sizes, atol=atol, rtol=rtol,
                    seed=seed)
    emit(result, json_path, quiet)
    if not result.passed:
        exit_failed(result, quiet, "the models differ")
