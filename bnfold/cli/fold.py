"""`bnfold fold`: fold the batch norms of a model, check the result, write it."""

from __future__ import annotations

from contextlib import ExitStack

import click
import onnx

from bnfold.cli.common import (Command, emit, exit_failed, load_job, note_written, parse_dims,
                               verify_options)
from bnfold.commit import staged
from bnfold.fold import fold, to_inference_mode, upgrade
from bnfold.io import load
from bnfold.rules.plan import scratch_directory
from bnfold.verify import verify


@click.command("fold", cls=Command)
@click.argument("input_path", metavar="INPUT")
@click.option("-o", "--output", metavar="OUTPUT", help="Where to write the folded model.")
@click.option("--in-place", is_flag=True, help="Overwrite INPUT (and its data file, keeping its name).")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime equivalence check.")
@verify_options
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
                 rtol: float | None, seed: int, runs: int, verbose: bool, json_path: str | None,
                 quiet: bool, force: bool,
                 dry_run: bool, allow_initializer_inputs: bool, training_to_inference: bool,
                 lower_standalone: bool) -> None:
    """Fold the batch norms of INPUT into their neighbouring layers.

    Batch norms are BatchNormalization nodes and the Sub/Mul/Add/Div chains by per-channel
    constants that Keras and other exporters write; no-op Casts are removed when something
    folds. What cannot be folded exactly is kept, and the report says why.

    OUTPUT is written only if onnxruntime finds that it computes the same outputs as INPUT
    (or with --no-verify or --force). When nothing folds, OUTPUT is a copy of INPUT, written
    without a check. Models of opset 1..6 with batch norms are converted to opset 7 first.
    """
    sizes = parse_dims(dims)
    job = load_job(input_path, output, in_place, dry_run, json_path, quiet, inputs)
    progress = job.progress
    progress("folding")
    had_external_data = any(t.data_location == onnx.TensorProto.EXTERNAL
                            for t in job.model.graph.initializer)
    with ExitStack() as stack:
        stage = None
        if job.output:
            stage = stack.enter_context(staged(job.output, data_name=job.data_name,
                                               protect=job.protect))
            stack.enter_context(scratch_directory(stage.folder, job.output))
        # New weights wait on disk for `save` to stream them: in the output's stage folder,
        # or (a dry run of a model with external data) in TMPDIR.
        folded, report = fold(job.model, base_dir=job.base_dir, inplace=True,  # not used again
                              spill=True if stage else None,
                              allow_initializer_inputs=allow_initializer_inputs,
                              training_to_inference=training_to_inference,
                              lower_standalone=lower_standalone)
        if stage is None:
            emit(report, json_path, quiet, job.reads)
            return
        if not report.changed:  # nothing to check: OUTPUT is INPUT as it was
            _write_unchanged(stage, report, input_path, folded, job.base_dir, had_external_data)
        else:
            progress("saving")
            stage.save(folded, base_dir=job.base_dir, external_data=had_external_data or None)
        if report.changed and not no_verify:
            progress("verifying")
            reference = input_path
            if report.upgraded_from is not None:  # onnxruntime cannot run BN-6: compare with
                reference = upgrade(load(input_path, check=False))  # onnx's conversion
            if training_to_inference:  # the reference is the original as it runs in inference
                reference = to_inference_mode(load(input_path, check=False)
                                              if isinstance(reference, str) else reference)
            report.verification = verify(reference, stage.path, inputs=inputs, dims=sizes,
                                         atol=atol, rtol=rtol, seed=seed, runs=runs,
                                         base_dir=job.base_dir, verbose=verbose)
            if not report.verification.passed and not force:
                stage.discard()
    note_written(report, stage.written)
    emit(report, json_path, quiet, job.reads)
    if report.verification and not report.verification.passed:
        done = f"written to {job.output} anyway (--force)" if force else "nothing written"
        exit_failed(report.verification, quiet, done)


def _write_unchanged(stage, report, input_path: str, model: onnx.ModelProto, base_dir: str,
                     had_external_data: bool) -> None:
    """OUTPUT as a byte copy of INPUT; a model with external data is saved again with a data
    file of its own (a copy would read INPUT's). In place too: the commit then also sweeps
    what killed runs left beside it."""
    if had_external_data:
        stage.save(model, base_dir=base_dir, external_data=True)
    else:
        with open(input_path, "rb") as f:
            stage.write_bytes(f.read())
    report.notes.append(f"{stage.target.given} written as a copy of {input_path} (nothing "
                        f"changed, no check needed)")
