"""`bnfold inspect`: the Dense layers of a model and what `fold` would do with its batch norms."""

from __future__ import annotations

import json
import os

import click

from bnfold.cli.common import Command, reads_of, write_json
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
    say, for each batch norm, whether `bnfold fold` can fold it and why not."""

    paths = reads_of()
    paths.read("MODEL", model_path)
    paths.write("--json", json_path)
    model = load(model_path)
    paths = reads_of(("MODEL", model_path, model))
    paths.write("--json", json_path)
    report = inspect(model, ops=ops, base_dir=os.path.dirname(os.path.abspath(model_path)))
    if json_path == "-":
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    if json_path:
        write_json(report.to_dict(), json_path, paths.inputs)
    click.echo(report.to_text())
