"""`bnfold inspect`: the Dense layers of a model and what `fold` would do with its batch norms."""

from __future__ import annotations

import json
import os

import click

from bnfold.cli.common import Command, RunInfo, reads_of, write_json
from bnfold.inspect import inspect
from bnfold.io import load


@click.command("inspect", cls=Command)
@click.argument("model_path", metavar="MODEL")
@click.option("--op", "ops", multiple=True, metavar="OP",
              help="List layers of this op (Gemm, MatMul, Conv, ConvTranspose; repeatable) "
                   "[default: Gemm and MatMul].")
@click.option("--json", "json_path", metavar="PATH",
              help="Also write the report as JSON ('-': only JSON, on stdout).")
def inspect_command(model_path: str, ops: tuple[str, ...], json_path: str | None) -> None:
    """List the Dense layers of MODEL (op, features, activation, batch norm around them) and
    say, for each batch norm, whether `bnfold fold` can fold it and why not.

    Layers are numbered in graph order: `bnfold insert --after '#2'` selects the second.

    \b
    Examples:
      bnfold inspect model.onnx
      bnfold inspect model.onnx --op Conv --json -
    """

    run = RunInfo("inspect", input=model_path, steps={"load": None, "inspect": None})
    paths = reads_of()
    paths.read("MODEL", model_path)
    paths.write("--json", json_path)
    with run.step("load"):
        model = load(model_path)
    paths = reads_of(("MODEL", model_path, model))
    paths.write("--json", json_path)
    with run.step("inspect"):
        report = inspect(model, ops=ops, base_dir=os.path.dirname(os.path.abspath(model_path)))
    data = {**run.to_dict(), **report.to_dict()} if json_path else None
    if json_path == "-":
        click.echo(json.dumps(data, indent=2))
        return
    if json_path:
        write_json(data, json_path, paths.inputs)
    click.echo(report.to_text())
