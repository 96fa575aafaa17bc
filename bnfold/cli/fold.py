"""`bnfold fold`: fold the batch norms of a model, check the result, write it."""

from __future__ import annotations

import onnx
import click

from bnfold.cli.common import (Command, emit, exit_failed, load_job, parse_dims,
                               verify_options)
from bnfold.fold import fold, to_inference_mode
from bnfold.io import load, save, staged
from bnfold.verify import verify


@click.command("fold", cls=Command)
@click.argument("input_path", metavar="INPUT")
@click.option("-o", "--output", metavar="OUTPUT", help="Where to write the folded model.")
@click.option("--in-place", is_flag=True, help="Overwrite INPUT (and its .data file).")
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
    sizes = parse_dims(dims)
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
        exit_failed(report.verification, quiet, done)
