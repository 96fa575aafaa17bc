"""`bnfold verify`: do two models compute the same outputs?"""

from __future__ import annotations

import click

from bnfold.cli.common import (Command, RunInfo, emit, exit_failed, parse_dims, progress_reporter,
                               reads_of, verify_options)
from bnfold.io import load, load_inputs
from bnfold.verify import verify


@click.command("verify", cls=Command)
@click.argument("reference", metavar="A")
@click.argument("candidate", metavar="B")
@verify_options
def verify_command(reference: str, candidate: str, inputs: str | None, dims: tuple[str, ...],
                   atol: float | None, rtol: float | None, seed: int, runs: int, verbose: bool,
                   json_path: str | None, quiet: bool) -> None:
    """Check that model B computes what model A computes, as accurately.

    Both run in onnxruntime, unoptimised, on the same inputs (--runs draws of random inputs,
    or --inputs). An output passes when B is within 8 ulps of A, or when B's error against A
    evaluated in float64 is at most 4 times A's own (8 for float16/bfloat16), plus 8 ulps;
    --atol/--rtol replace this by a plain tolerance. When no draw runs model A whole, each
    region where B differs from A is checked alone. Exit code 0 if every output passes, 1 if
    not (or if B fails where A runs), 2 if the check cannot be done.

    \b
    Examples:
      bnfold verify model.onnx model.folded.onnx
      bnfold verify model.onnx model.folded.onnx --dim batch=16 --atol 1e-4 --json -
    """
    sizes = parse_dims(dims)
    run = RunInfo("verify", input=reference, extra={"candidate": candidate},
                  steps={"load": None, "check": None})
    progress = progress_reporter(quiet)
    named = (("A", reference), ("B", candidate))
    paths = reads_of(inputs=inputs)
    for label, path in named:
        paths.read(label, path)
    paths.write("--json", json_path)  # before any work; again below with the data files
    if inputs:
        load_inputs(inputs)
    with run.step("load"):
        paths = reads_of(*[(label, path, load(path, progress=progress)) for label, path in named],
                         inputs=inputs)
    paths.write("--json", json_path)
    progress("verifying")
    with run.step("check"):
        result = verify(reference, candidate, inputs=inputs, dims=sizes, atol=atol, rtol=rtol,
                        seed=seed, runs=runs, verbose=verbose)
    emit(result, json_path, quiet, paths.inputs, run)
    if not result.passed:
        exit_failed(result, quiet, "the models differ")
