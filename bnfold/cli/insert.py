"""`bnfold insert`: add BatchNormalization after chosen Dense layers."""

from __future__ import annotations

import click
import onnx

from bnfold.cli.common import Command, RunInfo, emit, in_place_option, load_job, note_written
from bnfold.commit import staged
from bnfold.errors import BadInput, one_line
from bnfold.insert import PRESETS, insert


@click.command("insert", cls=Command)
@click.argument("input_path", metavar="INPUT")
@click.option("-o", "--output", metavar="OUTPUT", help="Where to write the model.")
@in_place_option
@click.option("--after", multiple=True, metavar="NAME",
              help="A layer name, a glob, or '#N': the N-th layer in graph order, as `bnfold "
                   "inspect` lists and numbers them (repeatable).")
@click.option("--op", "ops", multiple=True, metavar="OP",
              help="Only layers of this op; alone, all of them. Conv and ConvTranspose are "
                   "candidates only when named here (repeatable).")
@click.option("--all", "all_layers", is_flag=True, help="Every Dense layer (of the --op ops).")
@click.option("--before-activation", is_flag=True,
              help="Between the layer and its activation (torch's Linear -> BN -> ReLU) "
                   "[default: after the activation, as in Keras].")
@click.option("--axis", type=int, metavar="N",
              help="The axis of the layer's output to normalise, as Keras's "
                   "BatchNormalization(axis=N); negative counts from the end [default: the "
                   "features: -1 for Dense, 1 for Conv].")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default="keras", show_default=True,
              help="Default epsilon and momentum: keras 1e-3, 0.99; torch 1e-5, 0.9.")
@click.option("--epsilon", type=float, help="BN epsilon [default: by preset].")
@click.option("--momentum", type=float,
              help="Running-statistics momentum, ONNX/Keras convention: running = running * m "
                   "+ batch * (1 - m); torch's momentum t is 1 - t here [default: by preset].")
@click.option("--gamma", type=float, help="Initial scale [default: 1].")
@click.option("--beta", type=float, help="Initial shift [default: 0].")
@click.option("--mean", type=float, help="Initial running mean [default: 0].")
@click.option("--var", type=float, help="Initial running variance [default: 1].")
@click.option("--training", is_flag=True,
              help="The ONNX training-mode form (BN-15 training_mode=1, as torch exports in "
                   "training mode; older opsets are upgraded): batch statistics, with the updated "
                   "running mean and variance as extra graph outputs, for a loop that runs the "
                   "graph and feeds them back. For onnxruntime-training, use the default form "
                   "and `bnfold artifacts`. `bnfold fold --training-to-inference` turns it back.")
@click.option("--identity", is_flag=True,
              help="Initial values making each BN exactly the identity in inference mode; the "
                   "result is checked against INPUT with onnxruntime.")
@click.option("--json", "json_path", metavar="PATH",
              help="Also write the report as JSON ('-': to stdout).")
@click.option("-q", "--quiet", is_flag=True, help="Print errors only.")
def insert_command(input_path: str, output: str | None, in_place: bool, after: tuple[str, ...],
                   ops: tuple[str, ...], all_layers: bool, before_activation: bool, preset: str,
                   epsilon: float | None, momentum: float | None, gamma: float | None,
                   beta: float | None, mean: float | None, var: float | None, training: bool,
                   identity: bool, json_path: str | None, quiet: bool,
                   axis: int | None) -> None:
    """Insert a BatchNormalization after the selected Dense layers of INPUT; write OUTPUT.

    Rank-3 Dense outputs [batch, seq, features] are normalised over their features (Keras
    axis=-1) through a Transpose pair around the BN.

    The report names each BN's trainable tensors (scale, shift) and its state (running mean
    and variance: a trainer updates them itself; freeze them for the optimizer).

    \b
    Examples:
      bnfold insert model.onnx -o model.bn.onnx --after dense_2
      bnfold insert model.onnx -o model.bn.onnx --after '#2'     # second layer inspect lists
      bnfold insert model.onnx -o model.bn.onnx --all --preset torch --before-activation
    """

    initial = {"gamma": gamma, "beta": beta, "mean": mean, "var": var}
    given = [f"--{name}" for name, value in initial.items() if value is not None]
    if identity and given:
        raise BadInput(f"--identity chooses the initial values itself: drop {', '.join(given)}")
    if output is None and not in_place:
        raise BadInput("no output: give -o OUTPUT or --in-place")
    run = RunInfo("insert", input=input_path,
                  steps={"load": None, "insert": None, "save": None, "check": None})
    with run.step("load"):
        job = load_job(input_path, output, in_place, False, json_path, quiet)
    run.output = job.output
    job.progress("inserting")
    with run.step("insert"):
        result, report = insert(
            job.model, after=after, ops=ops, all_layers=all_layers,
            before_activation=before_activation, epsilon=epsilon, momentum=momentum,
            preset=preset, training=training, identity=identity, base_dir=job.base_dir,
            axis=axis,
            **{k: v for k, v in initial.items() if v is not None})
    del job.model
    with staged(job.output, data_name=job.data_name, protect=job.protect) as stage:
        job.progress("saving")
        with run.step("save"):
            stage.save(result, base_dir=job.base_dir)
        with run.step("check"):
            try:
                onnx.checker.check_model(stage.path, full_check=True)
            except onnx.checker.ValidationError as err:
                raise BadInput(f"the result fails onnx.checker: {one_line(err)}") from None
    note_written(report, stage.written)
    emit(report, json_path, quiet, job.reads, run)
