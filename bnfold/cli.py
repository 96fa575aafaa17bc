"""The `bnfold` command line: a thin layer over bnfold.io, bnfold.fold and bnfold.verify.

Only this module prints. The report goes to stderr, so stdout stays clean for pipelines.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import click
import onnx

from bnfold import __version__
from bnfold.cli_common import ReportsErrors, check_writable, emit, load_job, progress_reporter
from bnfold.errors import BadInput
from bnfold.fold import fold, to_inference_mode
from bnfold.io import load, save, staged
from bnfold.report import VerifyReport
from bnfold.verify import verify


class _Group(ReportsErrors, click.Group):
    pass


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bnfold")
def main() -> None:
    """Fold BatchNormalization into neighbouring layers of ONNX models, exactly.

    Results are checked with onnxruntime before they are written.

    Exit codes: 0 success, 1 verification failed, 2 bad input or usage.
    """


def _verify_options(command: Callable) -> Callable:
    options = [
        click.option("--inputs", metavar="FILE.npz",
                     help="Compare on these inputs (name -> array) instead of random ones."),
        click.option("--dim", "dims", multiple=True, metavar="NAME=VALUE",
                     help="Size of a symbolic input dimension (repeatable)."),
        click.option("--atol", type=float, help="Absolute tolerance [default: by dtype]."),
        click.option("--rtol", type=float, help="Relative tolerance [default: by dtype]."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the random inputs."),
        click.option("--json", "json_path", metavar="PATH", help="Also write the report as JSON."),
        click.option("-q", "--quiet", is_flag=True, help="Print errors only."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command("fold")
@click.argument("input_path", metavar="INPUT")
@click.option("-o", "--output", metavar="OUTPUT", help="Where to write the folded model.")
@click.option("--in-place", is_flag=True, help="Overwrite INPUT (and its .data file).")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime equivalence check.")
@_verify_options
@click.option("--force", is_flag=True, help="Write the output even if verification fails.")
@click.option("--dry-run", is_flag=True, help="Print what would be folded; write no model.")
@click.option("--allow-initializer-inputs", is_flag=True,
              help="Treat initializers listed as graph inputs as constants.")
@click.option("--training-to-inference", is_flag=True,
              help="Switch training-mode BN to inference mode, then fold them.")
@click.option("--lower-standalone", is_flag=True,
              help="Replace BN that cannot be folded with Mul+Add.")
def fold_command(input_path: str, output: str | None, in_place: bool, no_verify: bool,
                 inputs: str | None, dims: tuple[str, ...], atol: float | None,
                 rtol: float | None, seed: int, json_path: str | None, quiet: bool, force: bool,
                 dry_run: bool, allow_initializer_inputs: bool, training_to_inference: bool,
                 lower_standalone: bool) -> None:
    """Fold the batch norms of INPUT into their neighbouring layers.

    Batch norms are BatchNormalization nodes and the Sub/Mul/Add/Div chains by per-channel
    constants that Keras and other exporters write; no-op Casts are removed. What cannot be
    folded exactly is kept, and the report says why.

    OUTPUT is written only if onnxruntime finds that it computes the same outputs as INPUT
    (or with --no-verify or --force).
    """
    sizes = _parse_dims(dims)
    output, progress, base_dir, model = load_job(input_path, output, in_place, dry_run,
                                                 json_path, quiet)
    progress("folding")
    had_external_data = any(t.data_location == onnx.TensorProto.EXTERNAL
                            for t in model.graph.initializer)
    folded, report = fold(model, base_dir=base_dir, inplace=True,  # `model` is not used again
                          spill=True,  # new weights wait on disk for `save` to stream them
                          allow_initializer_inputs=allow_initializer_inputs,
                          training_to_inference=training_to_inference,
                          lower_standalone=lower_standalone)
    if dry_run:
        emit(report, json_path, quiet)
        return
    with staged(output) as stage:
        progress("saving")
        save(folded, stage.path, base_dir=base_dir, external_data=had_external_data or None)
        if not no_verify:
            progress("verifying")
            reference = input_path
            if training_to_inference:  # the reference is the original as it runs in inference
                reference = to_inference_mode(load(input_path, check=False))
            report.verification = verify(reference, stage.path, inputs=inputs, dims=sizes,
                                         atol=atol, rtol=rtol, seed=seed, base_dir=base_dir)
            if not report.verification.passed and not force:
                stage.discard()
    emit(report, json_path, quiet)
    if report.verification and not report.verification.passed:
        done = f"written to {output} anyway (--force)" if force else "nothing written"
        _exit_failed(report.verification, quiet, done)


@main.command("verify")
@click.argument("reference", metavar="A")
@click.argument("candidate", metavar="B")
@_verify_options
def verify_command(reference: str, candidate: str, inputs: str | None, dims: tuple[str, ...],
                   atol: float | None, rtol: float | None, seed: int, json_path: str | None,
                   quiet: bool) -> None:
    """Check that models A and B compute the same outputs.

    Both run in onnxruntime, unoptimised, on the same inputs. Exit code 0 if every output
    agrees, 1 if not.
    """
    sizes = _parse_dims(dims)
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
        _exit_failed(result, quiet, "the models differ")


def _parse_dims(specs: tuple[str, ...]) -> dict[str, int] | None:
    sizes = {}
    for spec in specs:
        match = re.fullmatch(r"([^=]+)=([0-9]+)", spec)
        if not match or int(match[2]) < 1:
            raise BadInput(f"--dim {spec}: expected NAME=VALUE, VALUE a positive integer")
        sizes[match[1]] = int(match[2])
    return sizes or None


def _exit_failed(verification: VerifyReport, quiet: bool, outcome: str) -> None:
    click.echo(f"bnfold: verification failed, {outcome}", err=True)
    if quiet:  # the report was not printed, but errors always are
        for failure in verification.failures:
            click.echo("  " + failure.describe(), err=True)
    click.get_current_context().exit(1)


# `inspect` and `insert` live in bnfold/cli_insert.py.
from bnfold.cli_insert import insert_command, inspect_command  # noqa: E402

main.add_command(inspect_command, "inspect")
main.add_command(insert_command, "insert")
