"""`bnfold calibrate`: set the running statistics of batch norms from data."""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack

import click

from bnfold.calibrate import METHODS, calibrate
from bnfold.cli.common import (Command, Paths, RunInfo, emit, in_place_option, load_job,
                               note_written)
from bnfold.commit import staged
from bnfold.errors import BadInput


@click.command("calibrate", cls=Command)
@click.argument("input_path", metavar="INPUT")
@click.option("--data", required=True, metavar="DATA",
              help="An .npz holding one array per model input, named like the input, first axis "
                   "= samples; or a folder of such .npz files and .npy files (for a model with "
                   "one input), read in name order, .npy memory-mapped.")
@click.option("-o", "--output", metavar="OUTPUT", help="Where to write the calibrated model.")
@in_place_option
@click.option("--only", multiple=True, metavar="NAME",
              help="Calibrate only this BatchNormalization (node name or glob; repeatable) "
                   "[default: all].")
@click.option("--method", type=click.Choice(METHODS), default="exact", show_default=True,
              help="exact: one pass over the data per BN level; batch: one pass, AIMET's "
                   "approximation (see above).")
@click.option("--batch-size", type=int, metavar="N",
              help="Samples per onnxruntime run [default: 32, or the inputs' fixed batch size].")
@click.option("--limit", type=int, metavar="N", help="Use at most N samples.")
@click.option("--json", "json_path", metavar="PATH",
              help="Also write the report as JSON ('-': to stdout).")
@click.option("-q", "--quiet", is_flag=True, help="Print errors only.")
def calibrate_command(input_path: str, data: str, output: str | None, in_place: bool,
                      only: tuple[str, ...], method: str, batch_size: int | None,
                      limit: int | None, json_path: str | None, quiet: bool) -> None:
    """Set the running mean and variance of the batch norms of INPUT from DATA; write OUTPUT.

    Each BN gets the population mean and variance, per channel, of its input when every BN
    upstream of it already uses its new statistics (accumulated in float64). For the batch
    norms `bnfold insert` writes (mean 0, variance 1: they do nothing until calibrated), and
    for a trained model whose weights changed since (pruned, quantized, fine-tuned), whose
    statistics no longer describe its activations. Only the statistics change.

    Cost, in passes over DATA: with --method exact (the default), one per BN level, BNs being
    grouped by how many BNs precede them on any path (a chain of k BNs: k passes; ResNet-50:
    49), each running only the part of the model its level needs. With --method batch, one:
    every BN normalises with its batch's statistics and gets their average (AIMET's
    re-estimation; an approximation that depends on the batch size).

    BNs inside subgraphs (If/Loop/Scan bodies) are reported and left as they are.

    \b
    Examples:
      bnfold calibrate model.bn.onnx --data samples.npz -o model.calibrated.onnx
      bnfold calibrate model.bn.onnx --data samples/ --limit 2000 -o model.calibrated.onnx
      bnfold calibrate model.bn.onnx --data samples.npz --method batch --in-place --json -
    """
    if not data:
        raise BadInput("--data '': empty path")
    if not os.path.exists(data):
        raise BadInput(f"--data {data}: no such file or folder")
    if output is None and not in_place:
        raise BadInput("no output: give -o OUTPUT or --in-place")
    run = RunInfo("calibrate", input=input_path, extra={"data_path": data},
                  steps={"load": None, "calibrate": None, "save": None})
    with run.step("load"):
        job = load_job(input_path, output, in_place, False, json_path, quiet)
    run.output = job.output
    paths = Paths()
    paths.read("--data", data)
    paths.write("-o", job.output)
    paths.write("--json", json_path)
    with ExitStack() as stack:
        bar = _Progress(quiet)
        stack.callback(bar.close)
        job.progress("calibrating")
        with run.step("calibrate"):
            result, report = calibrate(job.model, data, only=only, method=method,
                                       batch_size=batch_size, limit=limit,
                                       base_dir=job.base_dir, inplace=True, progress=bar)
    with staged(job.output, data_name=job.data_name, protect=[*job.protect, data]) as stage:
        job.progress("saving")
        with run.step("save"):
            stage.save(result, base_dir=job.base_dir)
    note_written(report, stage.written)
    emit(report, json_path, quiet, [*job.reads, data], run)


class _Progress:
    """A click progress bar on a terminal, over every pass; nothing for pipelines."""

    def __init__(self, quiet: bool):
        self.show = not quiet and sys.stderr.isatty()
        self.bar = None

    def __call__(self, samples: int, total: int | None) -> None:
        if not self.show or total is None:
            return
        if self.bar is None:
            self.bar = click.progressbar(length=total, label="bnfold: calibrating",
                                         file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(samples)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
