"""What the commands share: error reporting, output paths, options, progress, reports."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable

import click

from bnfold.errors import BadInput, BnfoldError, VerificationFailed, one_line
from bnfold.io import load, staged
from bnfold.report import FoldReport, VerifyReport


class Failure(click.ClickException):
    exit_code = 2  # 1 for VerificationFailed

    def show(self, file=None) -> None:
        click.echo(f"bnfold: error: {self.message}", err=True)


class ReportsErrors:
    """Mixin for click commands and groups: bnfold's errors and file errors become one line on
    stderr and exit code 2 (1 for a failed verification), never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (BnfoldError, OSError) as err:
            failure = Failure(one_line(err))
            failure.exit_code = 1 if isinstance(err, VerificationFailed) else 2
            raise failure from err


class Command(ReportsErrors, click.Command):
    """A bnfold subcommand: works in the `bnfold` group and on its own."""


def verify_options(command: Callable) -> Callable:
    """The options of the equivalence check, shared by `fold` and `verify`."""
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


def parse_dims(specs: tuple[str, ...]) -> dict[str, int] | None:
    sizes = {}
    for spec in specs:
        match = re.fullmatch(r"([^=]+)=([0-9]+)", spec)
        if not match or int(match[2]) < 1:
            raise BadInput(f"--dim {spec}: expected NAME=VALUE, VALUE a positive integer")
        sizes[match[1]] = int(match[2])
    return sizes or None


def exit_failed(verification: VerifyReport, quiet: bool, outcome: str) -> None:
    click.echo(f"bnfold: verification failed, {outcome}", err=True)
    if quiet:  # the report was not printed, but errors always are
        for failure in verification.failures:
            click.echo("  " + failure.describe(), err=True)
    click.get_current_context().exit(1)


def output_path(input_path: str, output: str | None, in_place: bool,
                dry_run: bool) -> str | None:
    if in_place:
        if output and not _same_file(input_path, output):
            raise BadInput("--in-place overwrites INPUT: leave out -o")
        return input_path
    if output is None:
        if dry_run:
            return None
        raise BadInput("no output: give -o OUTPUT, --in-place or --dry-run")
    if _same_file(input_path, output):
        raise BadInput(f"{output}: this is the input; use --in-place to overwrite it")
    return output


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_writable(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise BadInput(f"{path}: is a directory")
    if not os.path.isdir(directory):
        raise BadInput(f"{path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise BadInput(f"{path}: directory {directory} is not writable")


def progress_reporter(quiet: bool) -> Callable[[str], None]:
    """Tell a person at a terminal about slow steps; say nothing to pipelines."""
    if quiet or not sys.stderr.isatty():
        return lambda step: None
    return lambda step: click.echo(click.style(f"bnfold: {step}...", dim=True), err=True)


def write_json(data: dict, json_path: str) -> None:
    with staged(json_path) as stage, open(stage.path, "w") as f:
        json.dump(data, f, indent=2)


def emit(report: FoldReport | VerifyReport, json_path: str | None, quiet: bool) -> None:
    if json_path:
        write_json(report.to_dict(), json_path)
    if not quiet:
        click.echo(report.to_text(), err=True)


def load_job(input_path: str, output: str | None, in_place: bool, dry_run: bool,
             json_path: str | None, quiet: bool):
    """Check where results go before any work, then load INPUT (its external data stays on
    disk): (output path or None, progress reporter, INPUT's directory, model)."""
    output = output_path(input_path, output, in_place, dry_run)
    for path in (json_path, None if dry_run else output):
        if path:
            check_writable(path)
    progress = progress_reporter(quiet)
    base_dir = os.path.dirname(os.path.abspath(input_path))
    return output, progress, base_dir, load(input_path, progress=progress)
