"""`bnfold fold`: fold the batch norms of a model, check the result, write it."""

from __future__ import annotations

from contextlib import ExitStack

import click
import onnx

from bnfold.cli.common import (Command, emit, exit_failed, load_job, note_written, parse_dims,
                               verify_options)
from bnfold.commit import staged
from bnfold.fold import fold, to_inference_mode
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
    constants that Keras and other exporters write; no-op Casts are removed. What cannot be
    folded exactly is kept, and the report says why.

    OUTPUT is written only if onnxruntime finds that it computes the same outputs as INPUT
    (or with --no-verify or --force).
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
        progress("saving")
        stage.save(folded, base_dir=job.base_dir, external_data=had_external_data or None)
        if not no_verify:
            progress("verifying")
            reference = input_path
            if training_to_inference:  # the reference is the original as it runs in inference
                reference = to_inference_mode(load(input_path, check=False))
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
