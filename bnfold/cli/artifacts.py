"""`bnfold artifacts`: onnxruntime-training's artifacts for a model with batch norms."""

from __future__ import annotations

import os

import click

from bnfold.artifacts import LOSSES, OPTIMIZERS, training_artifacts
from bnfold.cli.common import Command, RunInfo, emit, progress_reporter, reads_of
from bnfold.io import load


@click.command("artifacts", cls=Command)
@click.argument("input_path", metavar="MODEL")
@click.option("-o", "--output", "directory", metavar="DIR", required=True,
              help="Directory to write the artifacts into (created; its parent must exist).")
@click.option("--loss", type=click.Choice(list(LOSSES)), required=True,
              help="cross-entropy: int64 class labels [batch] against logits [batch, classes]; "
                   "bce: float targets like the logits; mse: targets like the output.")
@click.option("--optimizer", type=click.Choice(list(OPTIMIZERS)), default="adamw",
              show_default=True, help="The optimizer model to write.")
@click.option("--logits", metavar="NAME",
              help="The tensor the loss reads [default: the input of a final Softmax (cross-"
                   "entropy) or Sigmoid (bce), else the model's output].")
@click.option("--freeze", multiple=True, metavar="GLOB",
              help="Also freeze the trainable tensors matching this glob (repeatable).")
@click.option("--force", is_flag=True,
              help="Write into a DIR that is not empty, replacing the artifacts in it.")
@click.option("--json", "json_path", metavar="PATH",
              help="Also write the report as JSON ('-': to stdout).")
@click.option("-q", "--quiet", is_flag=True, help="Print errors only.")
def artifacts_command(input_path: str, directory: str, loss: str, optimizer: str,
                      logits: str | None, freeze: tuple[str, ...], force: bool,
                      json_path: str | None, quiet: bool) -> None:
    """Write onnxruntime-training's artifacts for MODEL into DIR: training_model.onnx,
    eval_model.onnx, optimizer_model.onnx and checkpoint.

    Every BatchNormalization's running mean and variance are frozen state that the trainer
    updates in place; its scale and shift and the weights and biases of the layers on the
    loss's path are trained. Training-mode BN (`bnfold insert --training`) is set to inference
    mode first. IR and opset are capped to what onnxruntime-training 1.19 reads (10, 21).

    Needs onnxruntime-training, in its own environment (it replaces onnxruntime). After
    training, export the model with Module.export_model_for_inferencing(PATH, OUTPUTS), then
    `bnfold fold PATH`.

    \b
    Example:
      bnfold artifacts model.bn.onnx -o artifacts --loss cross-entropy
    """
    run = RunInfo("artifacts", input=input_path, output=directory,
                  steps={"load": None, "artifacts": None})
    paths = reads_of()
    paths.read("MODEL", input_path)
    paths.write("--json", json_path)
    progress = progress_reporter(quiet)
    # Unchecked: onnx's checker may be older than the model's IR; the trainer's copy is checked.
    with run.step("load"):
        model = load(input_path, check=False, progress=progress)
    paths = reads_of(("MODEL", input_path, model))
    paths.write("--json", json_path)
    progress("generating")
    with run.step("artifacts"):
        report = training_artifacts(model, directory, loss=loss, optimizer=optimizer,
                                    logits=logits, freeze=freeze, force=force,
                                    base_dir=os.path.dirname(os.path.abspath(input_path)))
    emit(report, json_path, quiet, paths.inputs, run)
