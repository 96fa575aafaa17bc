"""`bnfold fold`: fold the batch norms of a model, check the result, write it."""

from __future__ import annotations

import gc
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass

import click
import onnx

from bnfold.cli.batch import model_files, plan_outputs, run_batch
from bnfold.cli.common import (EXIT_STRICT, Command, RunInfo, emit, in_place_option, load_job,
                               model_size, note_written, parse_dims, report_failed,
                               verify_options, written_size)
from bnfold.commit import staged
from bnfold.errors import BadInput
from bnfold.fold import fold, to_inference_mode, upgrade
from bnfold.graph import MIN_OPSET, default_opset
from bnfold.io import load
from bnfold.rules.plan import scratch_directory
from bnfold.verify import verify
from bnfold.verify.runtime import session_ahead


@click.command("fold", cls=Command)
@click.argument("input_paths", metavar="INPUT...", nargs=-1, required=True)
@click.option("-o", "--output", metavar="OUTPUT", help="Where to write the folded model.")
@click.option("--output-dir", metavar="OUT",
              help="Several models (files, or folders of .onnx files): write each to OUT under "
                   "its own file name (OUT is created; its parent must exist).")
@click.option("--jobs", type=int, default=1, show_default=True, metavar="N",
              help="Several models: fold them in N worker processes.")
@in_place_option
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
@click.option("--strict", is_flag=True,
              help=f"Exit {EXIT_STRICT} if any batch norm is kept (the output is written all "
                   f"the same), for a pipeline that requires every BN folded.")
def fold_command(input_paths: tuple[str, ...], output: str | None, output_dir: str | None,
                 jobs: int, in_place: bool, no_verify: bool,
                 inputs: str | None, dims: tuple[str, ...], atol: float | None,
                 rtol: float | None, seed: int, runs: int, verbose: bool, json_path: str | None,
                 quiet: bool, force: bool,
                 dry_run: bool, allow_initializer_inputs: bool, training_to_inference: bool,
                 lower_standalone: bool, strict: bool) -> None:
    """Fold the batch norms of INPUT (or of each INPUT) into their neighbouring layers.

    Batch norms are BatchNormalization nodes and the Sub/Mul/Add/Div chains by per-channel
    constants that Keras and other exporters write; no-op Casts are removed when something
    folds. What cannot be folded exactly is kept, and the report says why.

    OUTPUT is written only if onnxruntime finds that it computes the same outputs as INPUT
    (or with --no-verify or --force). When nothing folds, OUTPUT is a copy of INPUT, written
    without a check. Models of opset 1..6 with batch norms are converted to opset 7 first.

    Several models (files, or folders standing for the .onnx files in them) are folded in one
    run with --output-dir, in this process or in --jobs N workers; each report is printed,
    --json gets one summary, and the exit code is the worst of the models' (2, then 1, then 3).

    \b
    Examples:
      bnfold fold model.onnx -o model.folded.onnx
      bnfold fold model.onnx -o model.folded.onnx --inputs data.npz --json report.json
      bnfold fold model.onnx --dry-run --strict      # CI: exit 3 if a batch norm stays
    """
    options = FoldOptions(no_verify=no_verify, inputs=inputs, dims=parse_dims(dims), atol=atol,
                          rtol=rtol, seed=seed, runs=runs, verbose=verbose, force=force,
                          dry_run=dry_run,
                          allow_initializer_inputs=allow_initializer_inputs,
                          training_to_inference=training_to_inference,
                          lower_standalone=lower_standalone, strict=strict)
    if len(input_paths) == 1 and not os.path.isdir(input_paths[0]) and output_dir is None:
        code = fold_file(input_paths[0], output, in_place, options, json_path, quiet)
    else:
        if output is not None:
            raise BadInput("several models: -o names one output; give --output-dir OUT")
        files = model_files(input_paths)
        outputs = plan_outputs(files, output_dir, in_place, dry_run)
        code = run_batch(files, outputs, in_place, options, json_path, quiet, jobs)
    if code:
        click.get_current_context().exit(code)


@dataclass
class FoldOptions:
    """What `bnfold fold` is asked to do to each model, but where it reads and writes."""

    no_verify: bool = False
    inputs: str | None = None
    dims: dict[str, int] | None = None
    atol: float | None = None
    rtol: float | None = None
    seed: int = 0
    runs: int = 1
    verbose: bool = False
    force: bool = False
    dry_run: bool = False
    allow_initializer_inputs: bool = False
    training_to_inference: bool = False
    lower_standalone: bool = False
    strict: bool = False


def fold_file(input_path: str, output: str | None, in_place: bool, options: FoldOptions,
              json_path: str | None, quiet: bool, summary: list | None = None) -> int:
    """Fold one model file, print (and write) its report; the exit code (0, 1 verification
    failed, 3 --strict and a batch norm kept). Bad input raises BnfoldError (exit 2).
    `summary`: a list to append the report's JSON to (batch runs)."""
    run = RunInfo("fold", input=input_path,
                  steps={"load": None, "fold": None, "save": None, "check": None})
    with run.step("load"):
        job = load_job(input_path, output, in_place, options.dry_run, json_path, quiet,
                       options.inputs)
    run.output = job.output
    progress = job.progress
    input_size = model_size(input_path, job.model, job.base_dir)
    progress("folding")
    had_external_data = any(t.data_location == onnx.TensorProto.EXTERNAL
                            for t in job.model.graph.initializer)
    with ExitStack() as stack:
        stage = None
        if job.output:
            stage = stack.enter_context(staged(job.output, data_name=job.data_name,
                                               protect=job.protect))
            stack.enter_context(scratch_directory(stage.folder, job.output))
        ahead = stage is not None and _check_ahead(job.model, options, input_size)
        if ahead:  # the check's first session, the original's, is built during the fold
            stack.enter_context(session_ahead(input_path, options.verbose))
        # New weights wait on disk for `save` to stream them when the model is large or keeps
        # its weights on disk: in the output's stage folder, or (a dry run of a model with
        # external data) in TMPDIR. A small model's stay in memory, and `save` writes the
        # model in one buffer instead of one tensor at a time.
        spill = True if stage and input_size > _SPILL_ABOVE else None
        with run.step("fold"):
            folded, report = fold(job.model, base_dir=job.base_dir, inplace=True,  # not used again
                                  spill=spill,
                                  allow_initializer_inputs=options.allow_initializer_inputs,
                                  training_to_inference=options.training_to_inference,
                                  lower_standalone=options.lower_standalone)
        report.before.size = input_size
        if stage is None:
            _emit(report, run, json_path, quiet, job.reads, summary)
            return _strict_code(report, options.strict)
        with run.step("save"):
            if not report.changed:  # nothing to check: OUTPUT is INPUT as it was
                _write_unchanged(stage, report, input_path, folded, job.base_dir,
                                 had_external_data)
            else:
                progress("saving")
                stage.save(folded, base_dir=job.base_dir,
                           external_data=had_external_data or None)
        job.model = folded = None  # saved: not needed again
        if report.changed and not options.no_verify:
            # The check reads both models from their files, one at a time, so the folded model
            # is not held beside them (the fold's bookkeeping leaves reference cycles that reach
            # it: collect them now rather than at some later allocation).
            gc.collect()
            progress("verifying")
            with run.step("check"), ExitStack() as check_stack:
                if ahead:  # and the folded model's, while the check reads the models
                    check_stack.enter_context(session_ahead(stage.path, options.verbose))
                reference = input_path
                if report.upgraded_from is not None:  # onnxruntime cannot run BN-6: compare
                    reference = upgrade(load(input_path, check=False))  # with onnx's conversion
                if options.training_to_inference:  # the original as it runs in inference
                    reference = to_inference_mode(load(input_path, check=False)
                                                  if isinstance(reference, str) else reference)
                report.verification = verify(reference, stage.path, inputs=options.inputs,
                                             dims=options.dims, atol=options.atol,
                                             rtol=options.rtol, seed=options.seed,
                                             runs=options.runs, base_dir=job.base_dir,
                                             verbose=options.verbose)
            if not report.verification.passed and not options.force:
                stage.discard()
        committing = time.perf_counter()
    run.steps["save"] += time.perf_counter() - committing  # the commit: renames into place
    note_written(report, stage.written)
    report.after.size = written_size(stage.written)
    _emit(report, run, json_path, quiet, job.reads, summary)
    if report.verification and not report.verification.passed:
        done = f"written to {job.output} anyway (--force)" if options.force else "nothing written"
        report_failed(report.verification, quiet, done)
        return 1
    return _strict_code(report, options.strict)


# Above this size (bytes, weights included), the new weights of a model held in memory are
# spilled to disk as they are made rather than held beside the old ones until the save.
_SPILL_ABOVE = 64 * 2**20

# Up to this size, the check's session of the original is built while the model folds (on
# a second core, for the price of holding the session beside the model during the fold).
_AHEAD_LIMIT = 64 * 2**20


def _check_ahead(model: onnx.ModelProto, options: FoldOptions, input_size: int) -> bool:
    """Whether the check will most likely run on INPUT as it is: it is checked, small, of an
    opset onnxruntime runs as it is, and has a batch norm node to fold."""
    return (not options.no_verify and not options.training_to_inference
            and input_size <= _AHEAD_LIMIT and default_opset(model) >= MIN_OPSET
            and any(n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")
                    for n in model.graph.node))


def _emit(report, run: RunInfo, json_path, quiet, protect, summary: list | None) -> None:
    emit(report, json_path, quiet, protect, run)
    if summary is not None:
        summary.append({**run.to_dict(), **report.to_dict()})


def _strict_code(report, strict: bool) -> int:
    """--strict: a kept batch norm fails the run (exit 3), after the report."""
    if strict and report.kept:
        names = ", ".join(d.node for d in report.kept)
        click.echo(f"bnfold: --strict: {len(report.kept)} batch norm(s) kept: {names}", err=True)
        return EXIT_STRICT
    return 0


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
